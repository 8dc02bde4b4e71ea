//! Glob patterns on object keys, written small rather than pulled in: keys are short
//! and only a handful of forms are needed.
//!
//! - `*` matches any run of characters within one path segment (never `/`),
//! - `?` matches one character other than `/`,
//! - `[abc]`, `[a-z]`, `[!a-z]` (or `[^a-z]`) match one character of (not of) a set,
//! - `**` as a whole segment matches any number of segments, none included
//!   (`**/*.csv`, `raw/**`, `**`),
//! - `\` makes the next character literal.
//!
//! A leading `.` is matched by `*` like any other character. Matching takes time
//! proportional to pattern × key at worst, so hostile keys cannot make it slow.

use std::fmt;

/// A compiled glob pattern; see the module documentation for the syntax.
#[derive(Clone, PartialEq, Eq)]
pub struct Glob {
    source: String,
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// `**`: zero or more whole segments.
    AnyDepth,
    Tokens(Vec<Token>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Literal(char),
    /// `?`
    One,
    /// `*`
    Star,
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
}

impl Token {
    fn matches(&self, c: char) -> bool {
        match self {
            Token::Literal(l) => *l == c,
            Token::One => true,
            Token::Star => false,
            Token::Class { negated, ranges } => {
                ranges.iter().any(|(lo, hi)| (*lo..=*hi).contains(&c)) != *negated
            }
        }
    }
}

impl Glob {
    /// Compiles a pattern, or says what is wrong with it.
    pub fn new(pattern: &str) -> Result<Glob, String> {
        if pattern.is_empty() {
            return Err("expected a pattern such as *.csv or **, got an empty string".into());
        }
        if pattern.starts_with('/') {
            return Err(format!(
                "the pattern is relative to the prefix and cannot start with `/`, got {pattern:?}"
            ));
        }
        let mut segments: Vec<Segment> = Vec::new();
        for seg in pattern.split('/') {
            if seg.is_empty() {
                return Err(format!(
                    "empty path segment (`//` or a trailing `/`) in {pattern:?}"
                ));
            }
            if seg == "**" {
                // `**/**` means the same as `**`; one is enough for the matcher.
                if segments.last() != Some(&Segment::AnyDepth) {
                    segments.push(Segment::AnyDepth);
                }
                continue;
            }
            if seg.contains("**") {
                return Err(format!(
                    "`**` must be a whole path segment (as in `**/*.csv`); within a segment use `*`, got {pattern:?}"
                ));
            }
            segments.push(Segment::Tokens(tokens(seg, pattern)?));
        }
        Ok(Glob {
            source: pattern.to_owned(),
            segments,
        })
    }

    /// The glob matching every key: `**`.
    pub fn any() -> Glob {
        Glob {
            source: "**".into(),
            segments: vec![Segment::AnyDepth],
        }
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether `path` (segments separated by `/`) matches the whole pattern. An
    /// empty path is one empty segment: `*` and `**` match it, `?` does not.
    pub fn is_match(&self, path: &str) -> bool {
        let parts: Vec<Vec<char>> = path.split('/').map(|s| s.chars().collect()).collect();
        wildcard(
            &self.segments,
            &parts,
            |s| matches!(s, Segment::AnyDepth),
            |s, part| match s {
                Segment::AnyDepth => false,
                Segment::Tokens(t) => wildcard(t, part, |t| *t == Token::Star, Token::matches_ref),
            },
        )
    }
}

impl Token {
    fn matches_ref(&self, c: &char) -> bool {
        self.matches(*c)
    }
}

/// The classic single-backtrack wildcard match: `pat` items either are stars (any
/// run of units) or match exactly one unit. Greedy with one remembered star is exact
/// for such patterns, and runs in O(pattern × units) at worst.
fn wildcard<P, U>(
    pat: &[P],
    units: &[U],
    is_star: impl Fn(&P) -> bool,
    matches: impl Fn(&P, &U) -> bool,
) -> bool {
    let (mut p, mut u) = (0, 0);
    // (index of the last star seen, unit index it is currently assumed to stop at)
    let mut star: Option<(usize, usize)> = None;
    while u < units.len() {
        if let Some(item) = pat.get(p) {
            if is_star(item) {
                star = Some((p, u));
                p += 1;
                continue;
            }
            if matches(item, &units[u]) {
                p += 1;
                u += 1;
                continue;
            }
        }
        match star {
            // Let the last star swallow one more unit and try again from there.
            Some((sp, su)) => {
                star = Some((sp, su + 1));
                p = sp + 1;
                u = su + 1;
            }
            None => return false,
        }
    }
    pat[p..].iter().all(is_star)
}

fn tokens(seg: &str, pattern: &str) -> Result<Vec<Token>, String> {
    let mut out = Vec::new();
    let mut chars = seg.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '*' => out.push(Token::Star),
            '?' => out.push(Token::One),
            '\\' => match chars.next() {
                Some(l) => out.push(Token::Literal(l)),
                None => {
                    return Err(format!(
                        "`\\` at the end of a segment escapes nothing in {pattern:?}"
                    ));
                }
            },
            '[' => {
                let negated = chars.next_if(|c| *c == '!' || *c == '^').is_some();
                let mut ranges = Vec::new();
                let mut first = true;
                loop {
                    let Some(lo) = chars.next() else {
                        return Err(format!(
                            "unclosed `[` in {pattern:?} (a set cannot hold `/`)"
                        ));
                    };
                    // `]` first in a set is a literal, so `[]]` matches `]`.
                    if lo == ']' && !first {
                        break;
                    }
                    first = false;
                    let lo = if lo == '\\' {
                        chars
                            .next()
                            .ok_or_else(|| format!("unclosed `[` in {pattern:?}"))?
                    } else {
                        lo
                    };
                    // `a-z` is a range; a `-` before the closing `]` is a literal.
                    if chars.peek() == Some(&'-') {
                        let mut ahead = chars.clone();
                        ahead.next();
                        if let Some(hi) = ahead.next().filter(|h| *h != ']') {
                            chars = ahead;
                            if hi < lo {
                                return Err(format!(
                                    "range `{lo}-{hi}` is backwards in {pattern:?}"
                                ));
                            }
                            ranges.push((lo, hi));
                            continue;
                        }
                    }
                    ranges.push((lo, lo));
                }
                out.push(Token::Class { negated, ranges });
            }
            other => out.push(Token::Literal(other)),
        }
    }
    // Consecutive stars mean one star; fewer stars keep the matcher's backtracking short.
    out.dedup_by(|a, b| *a == Token::Star && *b == Token::Star);
    Ok(out)
}

impl fmt::Debug for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Glob({:?})", self.source)
    }
}

impl fmt::Display for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl Default for Glob {
    fn default() -> Self {
        Glob::any()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::Glob;

    fn m(pattern: &str, path: &str) -> bool {
        Glob::new(pattern).unwrap().is_match(path)
    }

    #[test]
    fn star_stays_within_a_segment() {
        assert!(m("*.csv", "a.csv"));
        assert!(m("*.csv", ".csv"));
        assert!(m("*.csv", ".hidden.csv"));
        assert!(!m("*.csv", "sub/a.csv"));
        assert!(!m("*.csv", "a.csv.bak"));
        assert!(
            !m("*.csv", "a.CSV"),
            "matching is case-sensitive, as keys are"
        );
        assert!(m("data-*-*.csv", "data-1-2.csv"));
        assert!(m("a*b*c", "abxbxc"));
        assert!(!m("a*b*c", "abxbxd"));
        assert!(m("*/*.csv", "day1/a.csv"));
        assert!(!m("*/*.csv", "a.csv"));
    }

    #[test]
    fn question_mark_is_one_character_but_not_a_slash() {
        assert!(m("part-?.csv", "part-1.csv"));
        assert!(m("part-?.csv", "part-é.csv"), "one character, not one byte");
        assert!(!m("part-?.csv", "part-12.csv"));
        assert!(!m("a?b", "a/b"));
    }

    #[test]
    fn double_star_spans_segments() {
        assert!(m("**", "a"));
        assert!(m("**", "a/b/c.csv"));
        assert!(m("**/*.csv", "a.csv"), "`**/` may match no segment");
        assert!(m("**/*.csv", "x/y/a.csv"));
        assert!(!m("**/*.csv", "x/y/a.json"));
        assert!(m("raw/**", "raw/a"));
        assert!(m("raw/**", "raw/a/b"));
        assert!(!m("raw/**", "cooked/a"));
        assert!(m("a/**/z", "a/z"));
        assert!(m("a/**/z", "a/b/c/z"));
        assert!(!m("a/**/z", "a/b/c/y"));
        assert!(m("**/**/x", "x"));
        assert!(m("**/**", "a/b"));
    }

    #[test]
    fn sets_and_ranges() {
        assert!(m("[abc].csv", "b.csv"));
        assert!(!m("[abc].csv", "d.csv"));
        assert!(m("[a-c][0-9].csv", "c7.csv"));
        assert!(m("[!a-c].csv", "d.csv"));
        assert!(m("[^a-c].csv", "d.csv"));
        assert!(!m("[!a-c].csv", "a.csv"));
        assert!(m("[]]", "]"));
        assert!(m("[a-]", "-"));
        assert!(m("[*?]", "*"));
        assert!(!m("[*?]", "x"), "`*` and `?` are literals inside a set");
    }

    #[test]
    fn escapes_make_literals() {
        assert!(m(r"\*.csv", "*.csv"));
        assert!(!m(r"\*.csv", "a.csv"));
        assert!(m(r"what\?", "what?"));
        assert!(!m(r"what\?", "whatx"));
    }

    #[test]
    fn empty_paths() {
        assert!(m("**", ""));
        assert!(m("*", ""));
        assert!(!m("?", ""));
        assert!(!m("a", ""));
    }

    #[test]
    fn malformed_patterns_say_why() {
        for (p, why) in [
            ("", "empty"),
            ("/a", "cannot start with `/`"),
            ("a//b", "empty path segment"),
            ("a/", "empty path segment"),
            ("a**", "whole path segment"),
            ("[abc", "unclosed `[`"),
            ("[a/b]", "unclosed `[`"),
            ("[z-a]", "backwards"),
            ("a\\", "escapes nothing"),
        ] {
            let e = Glob::new(p).unwrap_err();
            assert!(e.contains(why), "{p:?}: {e}");
        }
    }

    #[test]
    fn hostile_keys_stay_fast() {
        let key = format!("{}b", "a".repeat(1000));
        let start = std::time::Instant::now();
        assert!(!m("*a*a*a*a*a*a*a*a*c", &key));
        let deep = vec!["a"; 500].join("/");
        assert!(!m("**/a/**/a/**/a/**/b", &deep));
        assert!(start.elapsed() < std::time::Duration::from_secs(1));
    }
}
