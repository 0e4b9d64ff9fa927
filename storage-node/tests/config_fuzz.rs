//! Bad input never panics: random token soup and random text get an answer (a model or a
//! located error), never a crash.

use std::path::Path;

use proptest::prelude::*;
use storage_node::config;

const TOKENS: &[&str] = &[
    "resource",
    "r",
    "on",
    "a",
    "b",
    "{",
    "}",
    ";",
    "volume",
    "0",
    "1",
    "device",
    "minor",
    "/dev/drbd1",
    "disk",
    "none",
    "/dev/x",
    "meta-disk",
    "internal",
    "/dev/y[0]",
    "flexible-meta-disk",
    "net",
    "protocol",
    "C",
    "Z",
    "address",
    "ipv6",
    "[::1]:7789",
    "10.0.0.1:7789",
    "10.0.0.2:7789",
    "node-id",
    "31",
    "99",
    "\"quoted word\"",
    "include",
    "\"*.none\"",
    "skip",
    "connection",
    "host",
    "port",
    "7000",
    "path",
    "connection-mesh",
    "hosts",
    "floating",
    "common",
    "global",
    "usage-count",
    "no",
    "options",
    "quorum",
    "majority",
    "resync-rate",
    "100M",
    "c-plan-ahead",
    "handlers",
    "startup",
    "#comment\n",
    "\n",
    "proxy",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn token_soup_never_panics(indexes in prop::collection::vec(0..TOKENS.len(), 0..80)) {
        let text: Vec<&str> = indexes.iter().map(|index| TOKENS[*index]).collect();
        let _ = config::parse_str("soup.res", &text.join(" "), Path::new("/nonexistent"));
    }

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,400}") {
        let _ = config::parse_str("text.res", &text, Path::new("/nonexistent"));
    }
}

/// A valid resource with every statement cut off at each token boundary: each prefix either
/// parses or fails with a location inside the text.
#[test]
fn every_prefix_of_a_valid_file_gets_an_answer() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/config/valid/drbd9-three-node-quorum.res"),
    )
    .expect("read");
    let lines = u32::try_from(text.lines().count()).expect("lines");
    for end in (0..text.len()).filter(|end| text.is_char_boundary(*end)) {
        if let Err(error) = config::parse_str("prefix.res", &text[..end], Path::new("/nonexistent"))
        {
            assert!(error.location.line <= lines + 1, "{error}");
        }
    }
}
