//! Deserializers whose errors read "expected X, got Y", whatever the input format.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, Visitor};
use serde::ser::{SerializeMap, Serializer};

use super::{Input, Priority, PriorityName, Secret, grammar};

fn got_str(v: &str) -> String {
    format!("{v:?}")
}

/// `v` if it is a whole number: what JSON Schema's `integer` admits of a float.
pub(crate) fn whole(v: f64) -> Option<f64> {
    (v.is_finite() && v.fract() == 0.0).then_some(v)
}

struct Count;

impl Visitor<'_> for Count {
    type Value = u32;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a non-negative integer")
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u32, E> {
        u32::try_from(v).map_err(|_| {
            E::custom(format!(
                "expected a non-negative integer below 2^32, got {v}"
            ))
        })
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<u32, E> {
        u32::try_from(v).map_err(|_| E::custom(format!("expected a non-negative integer, got {v}")))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<u32, E> {
        // JSON Schema counts 2.0 as an integer; so does this.
        match whole(v) {
            Some(w) if (0.0..=f64::from(u32::MAX)).contains(&w) => Ok(w as u32),
            _ => Err(E::custom(format!(
                "expected a non-negative integer, got {v}"
            ))),
        }
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<u32, E> {
        Err(E::custom(format!(
            "expected a non-negative integer, got {v}"
        )))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<u32, E> {
        Err(E::custom(format!(
            "expected a non-negative integer, got {}",
            got_str(v)
        )))
    }
    fn visit_unit<E: de::Error>(self) -> Result<u32, E> {
        Err(E::custom("expected a non-negative integer, got null"))
    }
}

pub(super) fn count<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    d.deserialize_any(Count)
}

/// A count or null; null is the same as leaving the field out.
pub(super) fn opt_count<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    struct OptCount;
    impl<'de> Visitor<'de> for OptCount {
        type Value = Option<u32>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a non-negative integer or null")
        }
        fn visit_unit<E: de::Error>(self) -> Result<Option<u32>, E> {
            Ok(None)
        }
        fn visit_none<E: de::Error>(self) -> Result<Option<u32>, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Option<u32>, D::Error> {
            d.deserialize_any(Count).map(Some)
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Option<u32>, E> {
            Count.visit_u64(v).map(Some)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Option<u32>, E> {
            Count.visit_i64(v).map(Some)
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Option<u32>, E> {
            Count.visit_f64(v).map(Some)
        }
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<Option<u32>, E> {
            Count.visit_bool(v).map(Some)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Option<u32>, E> {
            Count.visit_str(v).map(Some)
        }
    }
    d.deserialize_any(OptCount)
}

struct PositiveF64;

impl Visitor<'_> for PositiveF64 {
    type Value = f64;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a positive number")
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<f64, E> {
        self.visit_f64(v as f64)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<f64, E> {
        self.visit_f64(v as f64)
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<f64, E> {
        if v > 0.0 && v.is_finite() {
            Ok(v)
        } else {
            Err(E::custom(format!("expected a positive number, got {v}")))
        }
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<f64, E> {
        Err(E::custom(format!("expected a positive number, got {v}")))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<f64, E> {
        Err(E::custom(format!(
            "expected a positive number, got {}",
            got_str(v)
        )))
    }
}

pub(super) fn positive_f64<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    d.deserialize_any(PositiveF64)
}

impl<'de> Deserialize<'de> for Priority {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        const EXPECTED: &str = "expected low, normal, high or an integer from 0 to 9";
        impl Visitor<'_> for V {
            type Value = Priority;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("low, normal, high or an integer from 0 to 9")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Priority, E> {
                match u8::try_from(v) {
                    Ok(n) if n <= Priority::MAX_LEVEL => Ok(Priority::Level(n)),
                    _ => Err(E::custom(format!("{EXPECTED}, got {v}"))),
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Priority, E> {
                Err(E::custom(format!("{EXPECTED}, got {v}")))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Priority, E> {
                match whole(v) {
                    Some(w) if (0.0..=9.0).contains(&w) => Ok(Priority::Level(w as u8)),
                    _ => Err(E::custom(format!("{EXPECTED}, got {v}"))),
                }
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Priority, E> {
                Err(E::custom(format!("{EXPECTED}, got {v}")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Priority, E> {
                match v {
                    "low" => Ok(Priority::Named(PriorityName::Low)),
                    "normal" => Ok(Priority::Named(PriorityName::Normal)),
                    "high" => Ok(Priority::Named(PriorityName::High)),
                    other => Err(E::custom(format!("{EXPECTED}, got {}", got_str(other)))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for Input {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Input;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a URI string or {uri, path}")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Input, E> {
                Ok(Input {
                    uri: v.to_owned(),
                    path: None,
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Input, A::Error> {
                let mut uri = None;
                let mut path = None;
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "uri" => uri = Some(map.next_value::<String>()?),
                        "path" => path = Some(map.next_value::<String>()?),
                        other => {
                            return Err(de::Error::custom(format!(
                                "unknown field `{other}`, expected `uri` or `path`"
                            )));
                        }
                    }
                }
                let uri = uri.ok_or_else(|| de::Error::missing_field("uri"))?;
                Ok(Input { uri, path })
            }
        }
        d.deserialize_any(V)
    }
}

impl serde::Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // Serialization is how a spec reaches the ledger, the API and logs: never in clear.
        let mut m = s.serialize_map(Some(1))?;
        m.serialize_entry("redacted", &true)?;
        m.end()
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Secret;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a secret value as a string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Secret, E> {
                Ok(Secret::new(v))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Secret, A::Error> {
                // The stored form `{"redacted": true}`, and only it, reads back as a
                // secret without a value.
                let mut redacted = false;
                while let Some(k) = map.next_key::<String>()? {
                    if k != "redacted" || redacted || !map.next_value::<bool>()? {
                        return Err(de::Error::custom(
                            "expected a secret value as a string (or the stored form {\"redacted\": true})",
                        ));
                    }
                    redacted = true;
                }
                if !redacted {
                    return Err(de::Error::custom(
                        "expected a secret value as a string, got an empty map",
                    ));
                }
                Ok(Secret(None))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Secret, E> {
                Err(E::custom(format!(
                    "expected a secret value as a string, got {v}"
                )))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Secret, E> {
                Err(E::custom(format!(
                    "expected a secret value as a string, got {v}"
                )))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Secret, E> {
                Err(E::custom(format!(
                    "expected a secret value as a string, got {v}"
                )))
            }
        }
        d.deserialize_any(V)
    }
}

impl schemars::JsonSchema for Secret {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Secret".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A secret value. Stored and shown only as {\"redacted\": true}.",
            "oneOf": [
                { "type": "string" },
                { "type": "object", "properties": { "redacted": { "const": true } }, "required": ["redacted"], "additionalProperties": false }
            ]
        })
    }
}

impl schemars::JsonSchema for Input {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Input".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let uri = serde_json::json!({ "type": "string", "pattern": grammar::URI, "not": { "pattern": grammar::DOTDOT } });
        schemars::json_schema!({
            "description": "An input to stage into RESPAWN_INPUT_DIR: a URI, or {uri, path}.",
            "oneOf": [
                uri.clone(),
                {
                    "type": "object",
                    "properties": {
                        "uri": uri,
                        "path": { "type": "string", "pattern": grammar::RELATIVE, "not": { "pattern": grammar::DOTDOT } }
                    },
                    "required": ["uri"],
                    "additionalProperties": false
                }
            ]
        })
    }
}

/// Exit codes: 32-bit integers (whole floats included, as JSON Schema reads them).
pub(super) fn exit_codes<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<i32>, D::Error> {
    struct Code(i32);
    impl<'de> Deserialize<'de> for Code {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            const EXPECTED: &str = "expected an exit code (a 32-bit integer)";
            impl Visitor<'_> for V {
                type Value = Code;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("an exit code")
                }
                fn visit_i64<E: de::Error>(self, v: i64) -> Result<Code, E> {
                    i32::try_from(v)
                        .map(Code)
                        .map_err(|_| E::custom(format!("{EXPECTED}, got {v}")))
                }
                fn visit_u64<E: de::Error>(self, v: u64) -> Result<Code, E> {
                    i32::try_from(v)
                        .map(Code)
                        .map_err(|_| E::custom(format!("{EXPECTED}, got {v}")))
                }
                fn visit_f64<E: de::Error>(self, v: f64) -> Result<Code, E> {
                    match whole(v) {
                        Some(w) if (f64::from(i32::MIN)..=f64::from(i32::MAX)).contains(&w) => {
                            Ok(Code(w as i32))
                        }
                        _ => Err(E::custom(format!("{EXPECTED}, got {v}"))),
                    }
                }
                fn visit_str<E: de::Error>(self, v: &str) -> Result<Code, E> {
                    Err(E::custom(format!("{EXPECTED}, got {}", got_str(v))))
                }
                fn visit_bool<E: de::Error>(self, v: bool) -> Result<Code, E> {
                    Err(E::custom(format!("{EXPECTED}, got {v}")))
                }
            }
            d.deserialize_any(V)
        }
    }
    let codes: Vec<Code> = Deserialize::deserialize(d)?;
    Ok(codes.into_iter().map(|c| c.0).collect())
}
