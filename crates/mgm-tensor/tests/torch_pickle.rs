//! The restricted torch.save reader against the same tensors saved as safetensors by PyTorch
//! (`reference/gen_torch_pickle.py`: every storage type, shared / offset / transposed views, a
//! parameter, 0-d and empty tensors), and its refusals: a pickle that asks for any other
//! global, a truncated archive, a storage shorter than its tensors.

use std::io::{Read, Write};
use std::path::PathBuf;

use mgm_tensor::{safetensors, torch_pickle};

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(rel)
}

#[test]
fn torch_save_state_dict_loads_the_tensors_pytorch_saved() {
    let got = torch_pickle::load(fixture("torch_pickle/state.bin")).unwrap();
    let want = safetensors::load(fixture("torch_pickle/state.safetensors")).unwrap();
    assert_eq!(got.len(), 15);
    let mut names: Vec<&String> = want.keys().collect();
    names.sort();
    for name in names {
        let (g, w) = (&got[name], &want[name]);
        assert_eq!((g.dtype(), g.shape()), (w.dtype(), w.shape()), "{name}");
        assert_eq!(g.to_vec_f64().unwrap(), w.to_vec_f64().unwrap(), "{name}");
    }
}

/// A zip archive with `entries` (name, bytes), stored.
fn archive(entries: &[(&str, Vec<u8>)]) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    let mut z = zip::ZipWriter::new(f.reopen().unwrap());
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, bytes) in entries {
        z.start_file(*name, opts).unwrap();
        z.write_all(bytes).unwrap();
    }
    z.finish().unwrap();
    f
}

#[test]
fn a_pickle_asking_for_another_global_is_refused_unrun() {
    // protocol 2: os.system("touch pwned")
    let mut pkl = b"\x80\x02cos\nsystem\nq\x00X\x0b\x00\x00\x00".to_vec();
    pkl.extend_from_slice(b"touch pwnedq\x01\x85q\x02Rq\x03.");
    let f = archive(&[("x/data.pkl", pkl)]);
    let e = torch_pickle::load(f.path()).unwrap_err().to_string();
    assert!(
        e.contains("global `os.system`") && e.contains("not loaded"),
        "{e}"
    );
    // builtins.eval through STACK_GLOBAL (protocol 4)
    let pkl = b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93.".to_vec();
    let f = archive(&[("x/data.pkl", pkl)]);
    let e = torch_pickle::load(f.path()).unwrap_err().to_string();
    assert!(e.contains("global `builtins.eval`"), "{e}");
}

#[test]
fn truncated_and_corrupt_checkpoints_are_errors_that_name_the_file() {
    let path = fixture("torch_pickle/state.bin");
    let bytes = std::fs::read(&path).unwrap();
    let mut half = tempfile::NamedTempFile::new().unwrap();
    half.write_all(&bytes[..bytes.len() / 2]).unwrap();
    let e = torch_pickle::load(half.path()).unwrap_err().to_string();
    assert!(
        e.contains(&half.path().display().to_string()) && e.contains("zip"),
        "{e}"
    );
    // every entry copied, the first storage cut to 4 bytes
    let mut z = zip::ZipArchive::new(std::fs::File::open(&path).unwrap()).unwrap();
    let mut entries = Vec::new();
    for i in 0..z.len() {
        let mut f = z.by_index(i).unwrap();
        let name = f.name().to_string();
        let mut b = Vec::new();
        f.read_to_end(&mut b).unwrap();
        if name.ends_with("/data/0") {
            b.truncate(4);
        }
        entries.push((name, b));
    }
    let refs: Vec<(&str, Vec<u8>)> = entries
        .iter()
        .map(|(n, b)| (n.as_str(), b.clone()))
        .collect();
    let f = archive(&refs);
    let e = torch_pickle::load(f.path()).unwrap_err().to_string();
    assert!(
        e.contains("storage 0 holds 1 elements") && e.contains("truncated or corrupt"),
        "{e}"
    );
    let e = torch_pickle::load("/nonexistent/model.bin")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("/nonexistent/model.bin") && e.contains("cannot open"),
        "{e}"
    );
}
