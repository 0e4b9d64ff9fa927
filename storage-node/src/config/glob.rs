//! Just enough of glob(3) for `include` patterns: `*`, `?` and `[...]` within path components,
//! results sorted like glob's.

use std::path::{Component, Path, PathBuf};

fn has_magic(text: &str) -> bool {
    text.contains(['*', '?', '['])
}

/// Files matching `pattern` (an absolute or directory-relative path), sorted. A pattern
/// without wildcards yields itself if it exists.
pub(crate) fn expand(pattern: &Path) -> Vec<PathBuf> {
    let mut candidates = vec![PathBuf::new()];
    for component in pattern.components() {
        let text = component.as_os_str().to_string_lossy();
        let mut next = Vec::new();
        match component {
            Component::Normal(_) if has_magic(&text) => {
                for base in &candidates {
                    let directory = if base.as_os_str().is_empty() { Path::new(".") } else { base };
                    let Ok(entries) = std::fs::read_dir(directory) else { continue };
                    let mut names: Vec<String> = entries
                        .filter_map(Result::ok)
                        .map(|entry| entry.file_name().to_string_lossy().into_owned())
                        // Like glob(3), a leading dot must be matched explicitly.
                        .filter(|name| !name.starts_with('.') || text.starts_with('.'))
                        .filter(|name| matches(text.as_bytes(), name.as_bytes()))
                        .collect();
                    names.sort();
                    next.extend(names.into_iter().map(|name| base.join(name)));
                }
            }
            _ => next.extend(candidates.iter().map(|base| base.join(component.as_os_str()))),
        }
        candidates = next;
    }
    candidates.into_iter().filter(|path| path.is_file()).collect()
}

/// fnmatch without flags for one path component.
pub(crate) fn matches(pattern: &[u8], name: &[u8]) -> bool {
    match pattern.split_first() {
        None => name.is_empty(),
        Some((b'*', rest)) => (0..=name.len()).any(|skip| matches(rest, &name[skip..])),
        Some((b'?', rest)) => !name.is_empty() && matches(rest, &name[1..]),
        Some((b'[', rest)) => {
            let Some((&first, name_rest)) = name.split_first() else { return false };
            let (negated, body) = match rest.split_first() {
                Some((b'!' | b'^', body)) => (true, body),
                _ => (false, rest),
            };
            // A ']' right after '[' (or '[!') is a literal member.
            let Some(end) =
                body.iter().skip(1).position(|byte| *byte == b']').map(|index| index + 1)
            else {
                // No closing bracket: '[' is literal.
                return first == b'[' && matches(rest, name_rest);
            };
            let set = &body[..end];
            let mut found = false;
            let mut index = 0;
            while index < set.len() {
                if index + 2 < set.len() && set[index + 1] == b'-' {
                    found |= (set[index]..=set[index + 2]).contains(&first);
                    index += 3;
                } else {
                    found |= set[index] == first;
                    index += 1;
                }
            }
            found != negated && matches(&body[end + 1..], name_rest)
        }
        Some((literal, rest)) => name.first() == Some(literal) && matches(rest, &name[1..]),
    }
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn fnmatch() {
        let cases: &[(&str, &str, bool)] = &[
            ("*.res", "r0.res", true),
            ("*.res", "r0.res~", false),
            ("r?.res", "r1.res", true),
            ("r[0-3].res", "r2.res", true),
            ("r[!0-3].res", "r2.res", false),
            ("r[!0-3].res", "r7.res", true),
            ("*", "", true),
            ("a*b*c", "aXXbYc", true),
            ("a*b*c", "aXXbY", false),
            ("[", "[", true),
        ];
        for (pattern, name, expected) in cases {
            assert_eq!(matches(pattern.as_bytes(), name.as_bytes()), *expected, "{pattern} {name}");
        }
    }
}
