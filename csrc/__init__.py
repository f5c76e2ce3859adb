"""C++ ops built on first use with torch.utils.cpp_extension + ninja (installed as fastground.csrc)."""
