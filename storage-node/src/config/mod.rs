//! drbd.conf, the DRBD configuration syntax, read into Tandem's resolved model.
//!
//! `parse_file` / `parse_str` read `global`, `common`, `resource` sections (with `include`
//! globs, `skip`, 8.4-style and 9-style volume placement, `floating` hosts, `connection` and
//! `connection-mesh`) and resolve inheritance: `common` into every resource, resource-level
//! volumes into every host, resource net/disk options into every connection. Options are
//! checked against DRBD 9.2's keywords and ranges, so a file Tandem accepts is one `drbdadm`
//! accepts (the oracle test runs `drbdadm dump-xml` on every shipped file). The options the
//! engine uses are typed; every other accepted setting is named in a warning.
//!
//! Pure apart from reading the files: no environment, no hostname lookups (`local_node_name`
//! does that, separately).

mod constants;
mod glob;
mod lexer;
mod model;
mod options;
mod resolve;
mod tree;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use model::{
    AddressFamily, AfterSb0Pri, AfterSb1Pri, AfterSb2Pri, Config, Connection, ConnectionHost,
    Device, Disk, DiskOptions, Endpoint, FencingPolicy, MetaDisk, NetOptions, Node, OnCongestion,
    OnIoError, OnNoQuorum, Protocol, Quorum, Resource, ResourceOptions, Volume,
};

/// A place in a configuration file, printed `FILE:LINE` like drbdadm.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Location {
    /// The file as it was named (the path given, or the include's expansion).
    pub file: Arc<str>,
    /// 1-based; 0 when the problem concerns the file as a whole.
    pub line: u32,
}

impl Location {
    pub(crate) fn new(file: &str, line: u32) -> Location {
        Location { file: Arc::from(file), line }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

/// A configuration that cannot be used, with where and why, e.g.
/// `r0.res:7: Parse error: 'an options option keyword' expected, but got 'bogus'`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{location}: {message}")]
pub struct ConfigError {
    pub location: Location,
    pub message: String,
}

impl ConfigError {
    pub(crate) fn new(location: Location, message: impl Into<String>) -> ConfigError {
        ConfigError { location, message: message.into() }
    }
}

/// A setting the file may contain but Tandem does not act on (or a suspicious construct).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub location: Location,
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: warning: {}", self.location, self.message)
    }
}

/// Reads a configuration file and every file it includes.
pub fn parse_file(path: &Path) -> Result<Config, ConfigError> {
    let mut reader = tree::Reader::new();
    let statements = reader.read_file(path, 0)?;
    let mut config = resolve::resolve(&statements)?;
    config.files = reader.files_read;
    sort_warnings(&mut config, &path.display().to_string());
    Ok(config)
}

/// Warnings in reading order: by file (in the order files were read), then line.
fn sort_warnings(config: &mut Config, main_file: &str) {
    let mut order: Vec<String> = vec![main_file.to_owned()];
    order.extend(config.files.iter().map(|file| file.display().to_string()));
    let rank = |file: &str| order.iter().position(|known| known == file).unwrap_or(order.len());
    config.warnings.sort_by_key(|warning| (rank(&warning.location.file), warning.location.line));
}

/// Parses configuration text; `name` labels error locations and relative `include` patterns
/// resolve against `include_directory`.
pub fn parse_str(name: &str, text: &str, include_directory: &Path) -> Result<Config, ConfigError> {
    let mut reader = tree::Reader::new();
    let statements = reader.parse_text(name, text, include_directory, 0)?;
    let mut config = resolve::resolve(&statements)?;
    config.files = reader.files_read;
    sort_warnings(&mut config, name);
    Ok(config)
}

/// The environment variable drbd-utils reads to pretend to be another host.
pub const NODE_NAME_ENV: &str = "__DRBD_NODE__";

/// This node's name as drbdadm chooses it: `__DRBD_NODE__` if set and not empty, else the
/// kernel's host name (uname's nodename).
pub fn local_node_name() -> std::io::Result<String> {
    if let Ok(name) = std::env::var(NODE_NAME_ENV)
        && !name.is_empty()
    {
        return Ok(name);
    }
    let hostname = nix::unistd::gethostname().map_err(std::io::Error::from)?;
    Ok(hostname.to_string_lossy().into_owned())
}

/// Files a configuration was read from (the main file first), for reload checks.
pub fn files_of(config: &Config) -> &[PathBuf] {
    &config.files
}
