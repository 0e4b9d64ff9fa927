//! The README is the new user's only guide: the binaries it documents must exist and answer
//! `--help` with their usage, and the two set-up commands it names must exist.

use std::process::Command;
use std::time::Duration;

use tests::{binary, run_with_timeout, workspace_root};

/// The binary names in the README's "Binaries" table (first column, in backticks).
fn documented_binaries(readme: &str) -> Vec<String> {
    let section = readme.split("## Binaries").nth(1).expect("the README has a Binaries section");
    section
        .lines()
        .take_while(|line| !line.starts_with("## "))
        .filter(|line| line.starts_with("| `"))
        .filter_map(|line| line.split('`').nth(1).map(str::to_owned))
        .collect()
}

#[test]
fn every_documented_binary_prints_its_usage() {
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).expect("README.md");
    let binaries = documented_binaries(&readme);
    assert!(!binaries.is_empty(), "the Binaries table lists binaries");
    for name in binaries {
        let output =
            run_with_timeout(Command::new(binary(&name)).arg("--help"), Duration::from_secs(10));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(output.status.success(), "{name} --help failed: {text}");
        assert!(text.to_lowercase().contains("usage"), "{name} --help prints a usage: {text}");
    }
}

#[test]
fn the_two_setup_commands_exist_and_are_executable() {
    use std::os::unix::fs::PermissionsExt;
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).expect("README.md");
    let getting_started = readme
        .split("## Getting started")
        .nth(1)
        .expect("the README has a Getting started section");
    let block = getting_started.split("```sh").nth(1).expect("a shell block").split("```").next();
    let commands: Vec<&str> = block
        .expect("a closed shell block")
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    assert_eq!(commands, ["scripts/walkthrough", "scripts/test"], "exactly two commands");
    for command in commands {
        let mode = std::fs::metadata(workspace_root().join(command))
            .unwrap_or_else(|error| panic!("{command}: {error}"))
            .permissions()
            .mode();
        assert!(mode & 0o111 != 0, "{command} is executable");
    }
    let ci = std::fs::read_to_string(workspace_root().join(".ci/run")).expect(".ci/run");
    assert!(ci.contains("scripts/test"), ".ci/run runs the README's test command");
}
