//! Every limit of the replication engine, in one place.
