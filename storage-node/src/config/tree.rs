//! The uniform shape of drbd.conf: a statement is one or more words ended by `;` or followed by
//! a `{ ... }` block of statements. Keywords are interpreted later (resolve.rs); this layer only
//! knows braces and semicolons, and splices `include` files in place.

use std::path::{Path, PathBuf};

use super::constants::{CONFIG_FILE_BYTES_MAX, INCLUDE_DEPTH_MAX, INCLUDE_FILES_MAX};
use super::glob;
use super::lexer::{Token, TokenKind, tokenize};
use super::{ConfigError, Location};

#[derive(Debug, Clone)]
pub(crate) struct Word {
    pub(crate) text: String,
    pub(crate) location: Location,
}

#[derive(Debug, Clone)]
pub(crate) struct Statement {
    pub(crate) words: Vec<Word>,
    pub(crate) block: Option<Vec<Statement>>,
    pub(crate) location: Location,
}

impl Statement {
    pub(crate) fn keyword(&self) -> &str {
        &self.words[0].text
    }

    /// Words after the keyword.
    pub(crate) fn arguments(&self) -> &[Word] {
        &self.words[1..]
    }
}

/// Where source text comes from: files on disk, or in-memory text (parse_str) whose includes
/// resolve against a base directory.
pub(crate) struct Reader {
    pub(crate) files_read: Vec<PathBuf>,
}

impl Reader {
    pub(crate) fn new() -> Reader {
        Reader { files_read: Vec::new() }
    }

    pub(crate) fn read_file(
        &mut self,
        path: &Path,
        depth: usize,
    ) -> Result<Vec<Statement>, ConfigError> {
        let name = path.display().to_string();
        let metadata = std::fs::metadata(path).map_err(|error| {
            ConfigError::new(Location::new(&name, 0), format!("cannot read: {error}"))
        })?;
        if metadata.len() > CONFIG_FILE_BYTES_MAX {
            return Err(ConfigError::new(
                Location::new(&name, 0),
                format!(
                    "file of {} bytes exceeds the limit of {CONFIG_FILE_BYTES_MAX}",
                    metadata.len()
                ),
            ));
        }
        let text = std::fs::read_to_string(path).map_err(|error| {
            ConfigError::new(Location::new(&name, 0), format!("cannot read: {error}"))
        })?;
        self.files_read.push(path.to_owned());
        if self.files_read.len() > INCLUDE_FILES_MAX {
            return Err(ConfigError::new(
                Location::new(&name, 0),
                format!("more than {INCLUDE_FILES_MAX} configuration files included"),
            ));
        }
        let directory = path.parent().map(Path::to_owned).unwrap_or_default();
        self.parse_text(&name, &text, &directory, depth)
    }

    pub(crate) fn parse_text(
        &mut self,
        name: &str,
        text: &str,
        directory: &Path,
        depth: usize,
    ) -> Result<Vec<Statement>, ConfigError> {
        let tokens = tokenize(name, text)?;
        let mut parser = Parser { name, tokens: &tokens, position: 0 };
        let statements = parser.block_contents(None)?;
        // Includes are spliced at top level, where drbdadm accepts them.
        let mut expanded = Vec::with_capacity(statements.len());
        for statement in statements {
            if statement.keyword() == "include" && statement.block.is_none() {
                expanded.extend(self.include(&statement, directory, depth)?);
            } else {
                expanded.push(statement);
            }
        }
        Ok(expanded)
    }

    fn include(
        &mut self,
        statement: &Statement,
        directory: &Path,
        depth: usize,
    ) -> Result<Vec<Statement>, ConfigError> {
        let [pattern] = statement.arguments() else {
            return Err(ConfigError::new(
                statement.location.clone(),
                "Parse error: include takes exactly one file name or pattern",
            ));
        };
        if depth >= INCLUDE_DEPTH_MAX {
            return Err(ConfigError::new(
                statement.location.clone(),
                format!("include nested deeper than {INCLUDE_DEPTH_MAX} levels (a loop?)"),
            ));
        }
        let pattern_path = Path::new(&pattern.text);
        let absolute = if pattern_path.is_absolute() {
            pattern_path.to_owned()
        } else {
            directory.join(pattern_path)
        };
        let mut statements = Vec::new();
        // Like drbdadm (glob(3)), a pattern matching nothing includes nothing.
        for path in glob::expand(&absolute) {
            statements.extend(self.read_file(&path, depth + 1)?);
        }
        Ok(statements)
    }
}

struct Parser<'a> {
    name: &'a str,
    tokens: &'a [Token],
    position: usize,
}

impl Parser<'_> {
    fn location(&self, line: u32) -> Location {
        Location::new(self.name, line)
    }

    fn last_line(&self) -> u32 {
        self.tokens.last().map_or(1, |token| token.line)
    }

    /// Statements up to the matching `}` (consumed) or, at top level, the end of the text.
    fn block_contents(&mut self, opened_at: Option<u32>) -> Result<Vec<Statement>, ConfigError> {
        let mut statements = Vec::new();
        loop {
            let Some(token) = self.tokens.get(self.position) else {
                return match opened_at {
                    None => Ok(statements),
                    Some(line) => Err(ConfigError::new(
                        self.location(self.last_line()),
                        format!(
                            "Parse error: '}}' expected (for the '{{' on line {line}), but got end of file"
                        ),
                    )),
                };
            };
            match &token.kind {
                TokenKind::Close => {
                    if opened_at.is_none() {
                        return Err(ConfigError::new(
                            self.location(token.line),
                            "Parse error: a keyword expected, but got '}' (no block is open)",
                        ));
                    }
                    self.position += 1;
                    return Ok(statements);
                }
                TokenKind::Word { .. } => statements.push(self.statement()?),
                TokenKind::Open | TokenKind::Semicolon => {
                    return Err(ConfigError::new(
                        self.location(token.line),
                        format!("Parse error: a keyword expected, but got '{}'", token.describe()),
                    ));
                }
            }
        }
    }

    fn statement(&mut self) -> Result<Statement, ConfigError> {
        let first_line = self.tokens[self.position].line;
        let mut words = Vec::new();
        loop {
            let Some(token) = self.tokens.get(self.position) else {
                return Err(ConfigError::new(
                    self.location(self.last_line()),
                    "Parse error: ';' expected, but got end of file",
                ));
            };
            self.position += 1;
            match &token.kind {
                TokenKind::Word { text, .. } => {
                    words.push(Word { text: text.clone(), location: self.location(token.line) });
                }
                TokenKind::Semicolon => {
                    return Ok(Statement {
                        words,
                        block: None,
                        location: self.location(first_line),
                    });
                }
                TokenKind::Open => {
                    let block = self.block_contents(Some(token.line))?;
                    return Ok(Statement {
                        words,
                        block: Some(block),
                        location: self.location(first_line),
                    });
                }
                TokenKind::Close => {
                    return Err(ConfigError::new(
                        self.location(token.line),
                        "Parse error: ';' expected, but got '}'",
                    ));
                }
            }
        }
    }
}
