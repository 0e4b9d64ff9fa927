//! Generation identifiers and the decision table that compares them on connect.
