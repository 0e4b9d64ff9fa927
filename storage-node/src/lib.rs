//! The storage node: `tandemd` and `tandemadm`.
