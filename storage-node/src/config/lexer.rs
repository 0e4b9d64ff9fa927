//! Tokens of drbd.conf: words (bare or quoted), `{`, `}`, `;`; `#` starts a comment that runs
//! to the end of the line. Pure: text in, tokens out.

use super::ConfigError;
use super::Location;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TokenKind {
    Word { text: String, quoted: bool },
    Open,
    Close,
    Semicolon,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Token {
    pub(crate) kind: TokenKind,
    pub(crate) line: u32,
}

impl Token {
    /// How the token reads in an error message, as drbdadm prints it.
    pub(crate) fn describe(&self) -> String {
        match &self.kind {
            TokenKind::Word { text, .. } => text.clone(),
            TokenKind::Open => "{".to_owned(),
            TokenKind::Close => "}".to_owned(),
            TokenKind::Semicolon => ";".to_owned(),
        }
    }
}

fn is_word_byte(character: char) -> bool {
    !character.is_whitespace() && !matches!(character, '{' | '}' | ';' | '"')
}

pub(crate) fn tokenize(file: &str, text: &str) -> Result<Vec<Token>, ConfigError> {
    let mut tokens = Vec::new();
    let mut line: u32 = 1;
    let mut characters = text.chars().peekable();
    while let Some(&character) = characters.peek() {
        match character {
            '\n' => {
                line += 1;
                characters.next();
            }
            character if character.is_whitespace() => {
                characters.next();
            }
            '#' => {
                while let Some(&next) = characters.peek() {
                    if next == '\n' {
                        break;
                    }
                    characters.next();
                }
            }
            '{' | '}' | ';' => {
                characters.next();
                let kind = match character {
                    '{' => TokenKind::Open,
                    '}' => TokenKind::Close,
                    _ => TokenKind::Semicolon,
                };
                tokens.push(Token { kind, line });
            }
            '"' => {
                characters.next();
                let start_line = line;
                let mut value = String::new();
                loop {
                    match characters.next() {
                        None => {
                            return Err(ConfigError::new(
                                Location::new(file, start_line),
                                "Parse error: unterminated string (missing '\"')",
                            ));
                        }
                        Some('"') => break,
                        Some('\\') => match characters.next() {
                            Some('n') => value.push('\n'),
                            Some('t') => value.push('\t'),
                            Some(escaped) => {
                                if escaped == '\n' {
                                    line += 1;
                                }
                                value.push(escaped);
                            }
                            None => {
                                return Err(ConfigError::new(
                                    Location::new(file, start_line),
                                    "Parse error: unterminated string (missing '\"')",
                                ));
                            }
                        },
                        Some(other) => {
                            if other == '\n' {
                                line += 1;
                            }
                            value.push(other);
                        }
                    }
                }
                tokens.push(Token {
                    kind: TokenKind::Word { text: value, quoted: true },
                    line: start_line,
                });
            }
            _ => {
                let mut word = String::new();
                while let Some(&next) = characters.peek() {
                    if !is_word_byte(next) {
                        break;
                    }
                    word.push(next);
                    characters.next();
                }
                tokens.push(Token { kind: TokenKind::Word { text: word, quoted: false }, line });
            }
        }
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(text: &str) -> Vec<String> {
        tokenize("t", text).expect("tokens").iter().map(Token::describe).collect()
    }

    #[test]
    fn tokens() {
        assert_eq!(words("a b;# c { }\n d{e}"), ["a", "b", ";", "d", "{", "e", "}"]);
        assert_eq!(words(r#"x "a b\"c";"#), ["x", "a b\"c", ";"]);
        let tokens = tokenize("t", "a\n\nb \"x\ny\" c").expect("tokens");
        let lines: Vec<u32> = tokens.iter().map(|token| token.line).collect();
        assert_eq!(lines, [1, 3, 3, 4]);
        let error = tokenize("f.res", "a\n\"open").expect_err("unterminated");
        assert_eq!(error.to_string(), "f.res:2: Parse error: unterminated string (missing '\"')");
    }
}
