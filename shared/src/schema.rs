//! JSON Schemas of the job and reply bodies, generated from the Rust types.
//!
//! Producers in other languages read the committed copies in `docs/schema/`; the test below fails when
//! they drift from the types (regenerate with `UPDATE_SCHEMA=1 cargo test -p shared schema`).

use crate::job::JobRequest;
use crate::reply::JobReply;

/// `(file name, schema)` for every committed schema.
pub fn all() -> Vec<(&'static str, serde_json::Value)> {
    vec![
        (
            "job-request.schema.json",
            serde_json::to_value(schemars::schema_for!(JobRequest)).unwrap_or_default(),
        ),
        (
            "job-reply.schema.json",
            serde_json::to_value(schemars::schema_for!(JobReply)).unwrap_or_default(),
        ),
        (
            "control.schema.json",
            serde_json::to_value(schemars::schema_for!(crate::control::CancelJob)).unwrap_or_default(),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    #[test]
    fn committed_schemas_match_the_types() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/schema");
        for (name, schema) in super::all() {
            let text = serde_json::to_string_pretty(&schema).unwrap() + "\n";
            let path = dir.join(name);
            if std::env::var_os("UPDATE_SCHEMA").is_some() {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &text).unwrap();
            }
            let committed = std::fs::read_to_string(&path).unwrap_or_else(|e| {
                panic!(
                    "{} missing ({e}); run UPDATE_SCHEMA=1 cargo test -p shared schema",
                    path.display()
                )
            });
            assert_eq!(
                committed, text,
                "{name} is stale; run UPDATE_SCHEMA=1 cargo test -p shared schema"
            );
        }
    }
}
