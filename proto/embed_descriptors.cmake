# Writes OUT, a C file holding the bytes of IN (a serialized google.protobuf.FileDescriptorSet)
# as transport__descriptor_set. Run by proto/CMakeLists.txt at build time.
file(READ ${IN} hex HEX)
string(REGEX REPLACE "([0-9a-f][0-9a-f])" "0x\\1," bytes "${hex}")
file(WRITE ${OUT}
     "/* Generated at build time by proto/embed_descriptors.cmake from the .proto files the\n"
     " * server serves (protoc --descriptor_set_out --include_imports). Do not edit. */\n"
     "#include <stddef.h>\n"
     "extern const unsigned char transport__descriptor_set[];\n"
     "extern const size_t transport__descriptor_set_len;\n"
     "const unsigned char transport__descriptor_set[] = {${bytes}};\n"
     "const size_t transport__descriptor_set_len = sizeof transport__descriptor_set;\n")
