//! The backing-store layer: the only place in Tandem that performs block I/O on backing files
//! or block devices. Engines (io_uring, portable pread/pwrite) complete through one path.
