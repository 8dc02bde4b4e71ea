//! Reading rules from YAML or JSON, one file or a folder of them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::TriggerRule;
use crate::spec::{Format, SpecError};

/// Parses and checks one rule. Every error names a field path (`match.glob`,
/// `template.resources.gpus`), and a template that could never make a valid job
/// is an error now.
pub fn parse_rule(text: &str, format: Format) -> Result<TriggerRule, SpecError> {
    let rule: TriggerRule = match format {
        Format::Json => {
            let mut de = serde_json::Deserializer::from_str(text);
            let rule =
                serde_path_to_error::deserialize(&mut de).map_err(SpecError::from_path_error)?;
            de.end().map_err(|e| SpecError::one("", e.to_string()))?;
            rule
        }
        Format::Yaml => {
            let de = serde_yaml_ng::Deserializer::from_str(text);
            serde_path_to_error::deserialize(de).map_err(SpecError::from_path_error)?
        }
    };
    rule.check()?;
    Ok(rule)
}

/// Loads every `*.yaml`, `*.yml` and `*.json` file in `dir` (not below it), in
/// file-name order. A bad file is reported and skipped so it cannot stop the
/// others; a rule reusing an earlier rule's name is an error for the later file.
pub fn load_rules_dir(dir: &Path) -> (Vec<TriggerRule>, Vec<(PathBuf, SpecError)>) {
    let mut rules = Vec::new();
    let mut errors = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            let e = SpecError::one("", format!("cannot read {}: {e}", dir.display()));
            return (rules, vec![(dir.to_owned(), e)]);
        }
    };
    let mut files: Vec<PathBuf> = Vec::new();
    for entry in entries {
        match entry {
            Ok(entry) => {
                let path = entry.path();
                if is_rule_file(&path) && path.is_file() {
                    files.push(path);
                }
            }
            Err(e) => errors.push((
                dir.to_owned(),
                SpecError::one("", format!("cannot list {}: {e}", dir.display())),
            )),
        }
    }
    files.sort();
    let mut seen: BTreeMap<String, PathBuf> = BTreeMap::new();
    for path in files {
        let rule = std::fs::read_to_string(&path)
            .map_err(|e| SpecError::one("", format!("cannot read {}: {e}", path.display())))
            .and_then(|text| parse_rule(&text, Format::from_path(&path)));
        match rule {
            Ok(rule) => {
                if let Some(first) = seen.get(&rule.name) {
                    let e = SpecError::one(
                        "name",
                        format!(
                            "rule {:?} is already defined in {}",
                            rule.name,
                            first.display()
                        ),
                    );
                    errors.push((path, e));
                } else {
                    seen.insert(rule.name.clone(), path);
                    rules.push(rule);
                }
            }
            Err(e) => errors.push((path, e)),
        }
    }
    (rules, errors)
}

fn is_rule_file(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| {
        ["yaml", "yml", "json"]
            .iter()
            .any(|x| e.eq_ignore_ascii_case(x))
    })
}
