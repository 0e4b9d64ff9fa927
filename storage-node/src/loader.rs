//! Loads the resource configuration so that one broken included resource file costs only the
//! resources in that file: when `config::parse_file` fails inside an included file, the main
//! file is re-read with its `include` globs expanded to explicit files, minus every file found
//! broken so far, until the rest parses. The broken files are reported with drbdadm's
//! `file:line: message`.

use crate::config::{self, Config, ConfigError};
use crate::constants::{BROKEN_FILE_RETRIES_MAX, INCLUDE_FILES_MAX};
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    /// Included files left out, each with the error that broke it.
    pub broken: Vec<(PathBuf, ConfigError)>,
}

/// Matches one file-name pattern with `*` and `?` (what include globs use in practice).
fn matches(pattern: &[u8], name: &[u8]) -> bool {
    match (pattern.first(), name.first()) {
        (None, None) => true,
        (Some(b'*'), _) => {
            matches(&pattern[1..], name) || (!name.is_empty() && matches(pattern, &name[1..]))
        }
        (Some(b'?'), Some(_)) => matches(&pattern[1..], &name[1..]),
        (Some(p), Some(n)) if p == n => matches(&pattern[1..], &name[1..]),
        _ => false,
    }
}

/// Expands `dir/pattern` (wildcards in the last component only), sorted like drbdadm's glob.
fn expand(glob: &Path) -> Vec<PathBuf> {
    let text = glob.to_string_lossy();
    if !text.contains(['*', '?']) {
        return if glob.exists() { vec![glob.to_owned()] } else { Vec::new() };
    }
    let (Some(dir), Some(pattern)) = (glob.parent(), glob.file_name()) else { return Vec::new() };
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut out: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| matches(pattern.as_encoded_bytes(), e.file_name().as_encoded_bytes()))
        .map(|e| e.path())
        .take(INCLUDE_FILES_MAX)
        .collect();
    out.sort();
    out
}

/// The main file's text with every top-level `include "GLOB";` line replaced by explicit
/// includes of the matching files that are not excluded.
fn expanded_main(text: &str, base: &Path, excluded: &[PathBuf]) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let trimmed = line.trim_start();
        let glob = trimmed
            .strip_prefix("include")
            .filter(|rest| rest.starts_with(char::is_whitespace))
            .map(|rest| rest.split('#').next().unwrap_or("").trim().trim_end_matches(';').trim())
            .map(|g| g.trim_matches('"'));
        match glob {
            Some(glob) if !glob.is_empty() => {
                let path = base.join(glob);
                for file in expand(&path) {
                    if !excluded.iter().any(|x| same_file(x, &file)) {
                        out.push_str(&format!("include \"{}\";\n", file.display()));
                    }
                }
                out.push('\n');
            }
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// Parses `main`; a broken included file is left out and reported, a broken main file fails.
pub fn load(main: &Path) -> Result<Loaded, ConfigError> {
    let first = match config::parse_file(main) {
        Ok(config) => return Ok(Loaded { config, broken: Vec::new() }),
        Err(error) => error,
    };
    let Ok(text) = std::fs::read_to_string(main) else { return Err(first) };
    let base = main.parent().unwrap_or(Path::new(".")).to_owned();
    let main_name = main.display().to_string();
    let mut broken: Vec<(PathBuf, ConfigError)> = Vec::new();
    let mut error = first;
    for _ in 0..BROKEN_FILE_RETRIES_MAX {
        let culprit = PathBuf::from(&*error.location.file);
        if same_file(&culprit, main) || broken.iter().any(|(f, _)| same_file(f, &culprit)) {
            return Err(error);
        }
        broken.push((culprit, error));
        let excluded: Vec<PathBuf> = broken.iter().map(|(f, _)| f.clone()).collect();
        match config::parse_str(&main_name, &expanded_main(&text, &base, &excluded), &base) {
            Ok(config) => return Ok(Loaded { config, broken }),
            Err(next) => error = next,
        }
    }
    Err(error)
}

/// [`load`] plus every `*.res` file of `extra_directory` (resources created through the HTTP
/// API), each parsed alone so a broken one costs only itself.
pub fn load_with(main: &Path, extra_directory: &Path) -> Result<Loaded, ConfigError> {
    let mut loaded = load(main)?;
    for file in expand(&extra_directory.join("*.res")) {
        match config::parse_file(&file) {
            Ok(extra) => {
                for resource in extra.resources {
                    if loaded.config.resource(&resource.name).is_some() {
                        let error = ConfigError {
                            location: resource.location.clone(),
                            message: format!("resource {} is defined twice", resource.name),
                        };
                        loaded.broken.push((file.clone(), error));
                        continue;
                    }
                    loaded.config.resources.push(resource);
                }
            }
            Err(error) => loaded.broken.push((file, error)),
        }
    }
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_like_shell_wildcards() {
        let cases: &[(&str, &str, bool)] = &[
            ("*.res", "r0.res", true),
            ("*.res", "r0.res~", false),
            ("r?.res", "r1.res", true),
            ("r?.res", "r10.res", false),
            ("*", "", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
        ];
        for (pattern, name, expected) in cases {
            assert_eq!(matches(pattern.as_bytes(), name.as_bytes()), *expected, "{pattern} {name}");
        }
    }

    fn resource(name: &str, port: u16) -> String {
        format!(
            "resource {name} {{\n  volume 0 {{ device minor {port}; disk /tmp/{name}.img; \
             meta-disk internal; }}\n  on a {{ node-id 0; address 127.0.0.1:{port}; }}\n  \
             on b {{ node-id 1; address 127.0.0.2:{port}; }}\n}}\n"
        )
    }

    #[test]
    fn a_broken_included_file_costs_only_its_resources() {
        let dir = std::env::temp_dir().join(format!("tandem-loader-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("drbd.d")).expect("mkdir");
        std::fs::write(
            dir.join("drbd.conf"),
            "global { usage-count no; }\ninclude \"drbd.d/*.res\";\n",
        )
        .expect("write");
        std::fs::write(dir.join("drbd.d/r0.res"), resource("r0", 7789)).expect("write");
        std::fs::write(dir.join("drbd.d/r1.res"), "resource r1 {\n  bogus-keyword;\n}\n")
            .expect("write");
        std::fs::write(dir.join("drbd.d/r2.res"), resource("r2", 7791)).expect("write");
        let loaded = load(&dir.join("drbd.conf")).expect("the good files load");
        let names: Vec<&str> = loaded.config.resources.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["r0", "r2"]);
        assert_eq!(loaded.broken.len(), 1);
        assert!(loaded.broken[0].0.ends_with("r1.res"), "{:?}", loaded.broken);
        assert!(loaded.broken[0].1.to_string().contains("r1.res:2"), "{}", loaded.broken[0].1);

        std::fs::write(dir.join("drbd.conf"), "garbage here\n").expect("write");
        assert!(load(&dir.join("drbd.conf")).is_err(), "a broken main file is fatal");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
