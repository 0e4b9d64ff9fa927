//! A DRBD-style replicated block device in userspace.
