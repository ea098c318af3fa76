//! The default model, compiled into the library: the tiny MGM that `cargo xtask train-demo`
//! trains from scratch on the procedural shapes (configs/shapes.toml), used by `mgm generate`
//! when no `--model` is given. Its files are written once to a content-addressed directory
//! under the system's temporary directory (the loaders memory-map files).

use std::path::PathBuf;

use crate::{Error, Result};

const FILES: [(&str, &[u8]); 5] = [
    (
        "config.json",
        include_bytes!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/assets/default-model/config.json"
        )),
    ),
    (
        "model.safetensors",
        include_bytes!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/assets/default-model/model.safetensors"
        )),
    ),
    (
        "tokenizer.json",
        include_bytes!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/assets/default-model/tokenizer.json"
        )),
    ),
    (
        "tokenizer_config.json",
        include_bytes!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/assets/default-model/tokenizer_config.json"
        )),
    ),
    (
        "clip/config.json",
        include_bytes!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/assets/default-model/clip/config.json"
        )),
    ),
];

/// FNV-1a over every file: the directory name changes whenever the model does.
fn digest() -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (name, bytes) in FILES {
        for b in name.as_bytes().iter().chain(bytes) {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// The directory holding the default model's files, written on first use.
pub fn dir() -> Result<PathBuf> {
    let root = std::env::temp_dir();
    let dir = root.join(format!("mgm-default-model-{:016x}", digest()));
    if dir.join("config.json").exists() {
        return Ok(dir);
    }
    let io = |p: &std::path::Path, e: std::io::Error| Error::Io {
        path: p.display().to_string(),
        source: e,
    };
    // written beside, then renamed: a concurrent or interrupted first run never leaves a
    // half-written model under the final name
    let tmp = root.join(format!(
        "mgm-default-model-{:016x}.tmp{}",
        digest(),
        std::process::id()
    ));
    for (name, bytes) in FILES {
        let p = tmp.join(name);
        std::fs::create_dir_all(p.parent().expect("a file in a directory"))
            .map_err(|e| io(&p, e))?;
        std::fs::write(&p, bytes).map_err(|e| io(&p, e))?;
    }
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        // another process got there first
        Err(_) if dir.join("config.json").exists() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(dir)
        }
        Err(e) => Err(io(&dir, e)),
    }
}
