//! The end-to-end test harness shared by every Tandem test that runs real processes.
