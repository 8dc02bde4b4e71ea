//! Which blobs a rule takes, and the variables a matched blob binds.

use super::TriggerRule;
use crate::handlers::BlobCreated;

/// Longest key accepted; S3 and Azure both stop at 1024 bytes.
const MAX_KEY: usize = 1024;

/// The variables a template may use, in the order error messages list them.
pub const VARIABLES: [&str; 9] = [
    "key",
    "uri",
    "prefix",
    "basename",
    "stem",
    "ext",
    "rule",
    "version",
    "input_path",
];

/// The values a matched blob gives a rule's template variables.
///
/// For a marker rule the job is about the marker's folder, not the marker file:
/// `basename`, `stem` and `input_path` are the folder's name and `ext` is empty,
/// while `key` stays the marker's own key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bindings {
    /// `${rule}`: the rule's name.
    pub rule: String,
    /// `${key}`: the object's full key (for marker rules, the marker's key).
    pub key: String,
    /// `${uri}`: `bucket://<key>`, or `bucket://<folder>/` for marker rules.
    pub uri: String,
    /// `${prefix}`: the folder holding the object (or the marker), with a trailing `/`;
    /// empty at the bucket's root.
    pub prefix: String,
    /// `${basename}`: the key's last segment (for marker rules, the folder's name).
    pub basename: String,
    /// `${stem}`: `basename` without its extension.
    pub stem: String,
    /// `${ext}`: the extension without its dot (`csv`), or empty.
    pub ext: String,
    /// `${version}`: what identifies this version of the object.
    pub version: String,
    /// `${input_path}`: where the input lands under `RESPAWN_INPUT_DIR`.
    pub input_path: String,
    /// What one job is made per (with `version`): the key, or for marker rules the
    /// folder. Not a template variable.
    pub subject: String,
}

impl Bindings {
    /// The bindings for one object.
    pub fn for_object(rule: &str, key: &str, version: &str) -> Bindings {
        let (prefix, basename) = match key.rsplit_once('/') {
            Some((folder, base)) => (format!("{folder}/"), base),
            None => (String::new(), key),
        };
        let (stem, ext) = split_ext(basename);
        Bindings {
            rule: rule.to_owned(),
            key: key.to_owned(),
            uri: format!("bucket://{key}"),
            prefix,
            basename: basename.to_owned(),
            stem: stem.to_owned(),
            ext: ext.to_owned(),
            version: version.to_owned(),
            input_path: basename.to_owned(),
            subject: key.to_owned(),
        }
    }

    /// The bindings for a folder completed by its marker file `marker_key`;
    /// `folder` ends in `/`.
    pub fn for_folder(rule: &str, folder: &str, marker_key: &str, version: &str) -> Bindings {
        let trimmed = folder.trim_end_matches('/');
        let name = trimmed.rsplit('/').next().unwrap_or(trimmed);
        Bindings {
            rule: rule.to_owned(),
            key: marker_key.to_owned(),
            uri: format!("bucket://{folder}"),
            prefix: folder.to_owned(),
            basename: name.to_owned(),
            stem: name.to_owned(),
            ext: String::new(),
            version: version.to_owned(),
            input_path: name.to_owned(),
            subject: folder.to_owned(),
        }
    }

    /// A variable's value by name; `None` for a name that is not a variable.
    pub fn get(&self, var: &str) -> Option<&str> {
        Some(match var {
            "key" => &self.key,
            "uri" => &self.uri,
            "prefix" => &self.prefix,
            "basename" => &self.basename,
            "stem" => &self.stem,
            "ext" => &self.ext,
            "rule" => &self.rule,
            "version" => &self.version,
            "input_path" => &self.input_path,
            _ => return None,
        })
    }
}

/// `a.tar.gz` → (`a.tar`, `gz`); a leading dot starts a name, not an extension.
fn split_ext(basename: &str) -> (&str, &str) {
    match basename.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() => (stem, ext),
        _ => (basename, ""),
    }
}

/// Checks a key from a blob event, which anyone able to write to the bucket
/// controls: keys that could climb out of a folder when used as a path (`..`, `.`,
/// a leading `/`, empty segments), hold control characters (which could forge log
/// lines or confuse the workload's argv) or are longer than object stores allow
/// are refused.
pub fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("the key is empty".into());
    }
    if key.len() > MAX_KEY {
        return Err(format!("the key is longer than {MAX_KEY} bytes"));
    }
    if key.starts_with('/') {
        return Err("the key starts with `/`".into());
    }
    if key.chars().any(char::is_control) {
        return Err("the key holds control characters".into());
    }
    // A backslash is a separator to Windows paths, so it splits segments here too.
    let segments: Vec<&str> = key.split(['/', '\\']).collect();
    if segments.iter().any(|s| *s == ".." || *s == ".") {
        return Err("the key has a `.` or `..` segment".into());
    }
    // The last segment is empty for a folder placeholder (`data/`), which is harmless.
    if segments[..segments.len() - 1].iter().any(|s| s.is_empty()) {
        return Err("the key has an empty segment (`//`)".into());
    }
    Ok(())
}

impl TriggerRule {
    /// The variables for `event` when this rule takes it, `None` when it does not.
    ///
    /// A rule takes a key under its `match.prefix` whose rest matches `match.glob`. A
    /// marker rule takes only its marker file, `<folder>/<marker>`, and its glob is
    /// matched against that folder relative to the prefix (without the trailing `/`;
    /// empty when the marker sits right in the prefix). Unsafe keys (see
    /// [`check_key`]), folder placeholders (`data/`) and markers at the bucket's
    /// root (which would make the whole bucket one input) are never taken.
    pub fn matches(&self, event: &BlobCreated) -> Option<Bindings> {
        let key = event.key.as_str();
        if check_key(key).is_err() || key.ends_with('/') {
            return None;
        }
        let rest = key.strip_prefix(self.when.prefix.as_str())?;
        match &self.when.marker {
            None => self
                .when
                .glob
                .is_match(rest)
                .then(|| Bindings::for_object(&self.name, key, &event.version)),
            Some(marker) => {
                let folder_rest = if rest == marker {
                    ""
                } else {
                    rest.strip_suffix(marker.as_str())?.strip_suffix('/')?
                };
                let folder = &key[..key.len() - marker.len()];
                if folder.is_empty() || !self.when.glob.is_match(folder_rest) {
                    return None;
                }
                Some(Bindings::for_folder(
                    &self.name,
                    folder,
                    key,
                    &event.version,
                ))
            }
        }
    }
}
