//! An RFC 7143 iSCSI target with SPC-4/SBC-3 disk emulation.
