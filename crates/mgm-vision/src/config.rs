//! Reading JSON config files with errors that name the file and the key.

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::{Error, Result};

/// Reads and deserializes a JSON file; parse errors name the file.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })?;
    parse_json(&text, &path.display().to_string())
}

/// Deserializes JSON text; `source` names where it came from in errors.
pub fn parse_json<T: DeserializeOwned>(text: &str, source: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| Error::Json {
        path: source.to_string(),
        msg: e.to_string(),
    })
}

/// The value of a required key, or [`Error::MissingKey`] naming it and the file.
pub fn required<T>(value: Option<T>, path: &str, key: &str) -> Result<T> {
    value.ok_or_else(|| Error::MissingKey {
        path: path.to_string(),
        key: key.to_string(),
    })
}
