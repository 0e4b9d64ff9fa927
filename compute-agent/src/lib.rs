//! `tandem-compute`: attaches Tandem volumes to QEMU/KVM instances.
