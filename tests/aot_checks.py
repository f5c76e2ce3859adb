"""Checks shared by the ahead-of-time compile tests of every kernel file."""
from fastground.kernels import aot


def assert_fits_chip(compiled, cc: int, name_width: int = 27) -> None:
    rows = [r for r in compiled if r["cc"] == cc]
    assert rows
    for r in rows:
        print(f"sm_{cc} {r['kernel']:{name_width}s} smem {r['smem']:7d} B  regs {r['registers']:3d} "
              f"stack {r.get('stack', 0):3d}  w{r['warps']} s{r['stages']}  {r.get('types', '')} {r['consts']}")
    too_big = [r for r in rows if not aot.fits(r["smem"], cc)]
    assert not too_big, f"over {aot.SMEM_LIMIT[cc]} B of shared memory: {too_big}"


def assert_no_spills(compiled, cc: int) -> None:
    spills = [r for r in compiled if r["cc"] == cc and (r["local"] or r["stack"])]
    assert not spills, f"register spills: {spills}"


def unique_launches(launches):
    """One launch per compiled configuration, in first-seen order."""
    unique = {}
    for launch in launches:
        unique.setdefault(launch.key(), launch)
    return list(unique.values())
