//! The checked-in JSON Schemas are what the Rust types generate.
//! Regenerate with `cargo run -p respawn-cli -- schema --write schemas`.

use std::path::Path;

#[test]
fn checked_in_schemas_are_current() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas");
    for (name, generated) in respawn_core::schema::all() {
        let path = dir.join(name);
        let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            checked_in == generated,
            "{} is stale: run `cargo run -p respawn-cli -- schema --write schemas` and commit it",
            path.display()
        );
    }
}
