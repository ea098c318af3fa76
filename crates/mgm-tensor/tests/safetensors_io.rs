//! safetensors I/O: round trips of every dtype and layout, zero-copy loading, errors that name
//! the file and the tensor, and a fuzz property that no corrupted file makes the reader panic.
mod common;
use common::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use mgm_tensor::safetensors::{SafeTensorsFile, load, save};
use mgm_tensor::{DType, Device, Error, Tensor, Var};
use proptest::prelude::*;

const ALL: [DType; 7] = [
    DType::F32,
    DType::F64,
    DType::F16,
    DType::BF16,
    DType::I64,
    DType::U32,
    DType::U8,
];

/// Values that every dtype represents exactly (small non-negative integers and halves for floats).
fn exact_values(seed: u64, n: usize, dtype: DType) -> Vec<f64> {
    values(seed, n, 1.0)
        .into_iter()
        .map(|v| {
            let k = ((v + 1.0) * 60.0).floor();
            if dtype.is_float() { k / 2.0 - 10.0 } else { k }
        })
        .collect()
}

/// Writes a raw safetensors file from a header JSON string and a data section.
fn write_raw(path: &Path, header: &str, data: &[u8]) {
    let mut h = header.as_bytes().to_vec();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&h);
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes).unwrap();
}

fn err_of(path: &Path) -> String {
    match SafeTensorsFile::open(path) {
        Ok(f) => {
            // Header passed: the error must come from reading a tensor.
            for n in f.names() {
                if let Err(e) = f.get(n) {
                    return e.to_string();
                }
            }
            panic!("{} opened and read without error", path.display())
        }
        Err(e) => e.to_string(),
    }
}

fn tmp() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.safetensors");
    (dir, p)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn round_trip_every_dtype_and_layout(shape in shape_strategy(3, 4), kind in view_kind(), seed in 0u64..1000) {
        let (_d, path) = tmp();
        let n: usize = shape.iter().product();
        let mut tensors = Vec::new();
        let mut expected = HashMap::new();
        for (i, &dt) in ALL.iter().enumerate() {
            let vals = exact_values(seed + i as u64, n, dt);
            let t = make_view(&vals, &shape, kind, dt);
            expected.insert(format!("t.{}", dt.as_str()), (dt, vals));
            tensors.push((format!("t.{}", dt.as_str()), t));
        }
        save(&path, tensors.iter().map(|(k, t)| (k.as_str(), t))).unwrap();
        let f = SafeTensorsFile::open(&path).unwrap();
        prop_assert_eq!(f.len(), ALL.len());
        prop_assert_eq!(f.metadata().get("format").map(String::as_str), Some("pt"));
        for (name, (dt, vals)) in &expected {
            let t = f.get(name).unwrap();
            prop_assert_eq!(t.dtype(), *dt);
            prop_assert_eq!(t.shape(), &shape[..]);
            prop_assert_eq!(t.to_vec_f64().unwrap(), vals.clone(), "{}", name);
            // The writer aligns every tensor, so every non-empty one is read in place.
            prop_assert!(n == 0 || t.cpu_storage().is_mapped(), "{} was copied", name);
        }
    }
}

#[test]
fn loaded_tensor_points_into_the_map() {
    let (_d, path) = tmp();
    let t = Tensor::from_vec((0..64).map(|i| i as f32).collect::<Vec<_>>(), &[8, 8]).unwrap();
    save(&path, [("w", &t)]).unwrap();
    let f = SafeTensorsFile::open(&path).unwrap();
    let a = f.get("w").unwrap();
    let b = f.get("w").unwrap();
    assert!(a.cpu_storage().is_mapped());
    // Both reads alias the same mapped bytes: nothing was copied.
    assert_eq!(
        a.storage_slice::<f32>().unwrap().as_ptr(),
        b.storage_slice::<f32>().unwrap().as_ptr()
    );
    assert_eq!(a.to_vec::<f32>().unwrap(), t.to_vec::<f32>().unwrap());
    // and views of it work as for any tensor
    assert_eq!(
        a.t()
            .unwrap()
            .narrow(0, 1, 1)
            .unwrap()
            .to_vec::<f32>()
            .unwrap(),
        vec![1., 9., 17., 25., 33., 41., 49., 57.]
    );
}

#[test]
fn load_returns_every_tensor_and_saving_a_map_works() {
    let (_d, path) = tmp();
    let mut m = HashMap::new();
    m.insert(
        "a".to_string(),
        Tensor::from_vec(vec![1i64, -2, 3], &[3]).unwrap(),
    );
    m.insert("b.c".to_string(), Tensor::scalar(2.5f64));
    m.insert(
        "empty".to_string(),
        Tensor::zeros(&[0, 3], DType::BF16, Device::Cpu).unwrap(),
    );
    save(&path, &m).unwrap();
    let back = load(&path).unwrap();
    assert_eq!(back.len(), 3);
    assert_eq!(back["a"].to_vec::<i64>().unwrap(), vec![1, -2, 3]);
    assert_eq!(back["b.c"].shape(), &[] as &[usize]);
    assert_eq!(back["b.c"].to_scalar::<f64>().unwrap(), 2.5);
    assert_eq!(back["empty"].shape(), &[0, 3]);
    assert_eq!(back["empty"].dtype(), DType::BF16);
}

#[test]
fn save_detaches_tracked_tensors_and_rejects_duplicates() {
    let (_d, path) = tmp();
    let v = Var::from_tensor(&Tensor::from_vec(vec![1f32, 2.], &[2]).unwrap()).unwrap();
    let y = v.as_tensor().mul_scalar(3.0).unwrap();
    save(&path, [("y", &y)]).unwrap();
    assert_eq!(
        load(&path).unwrap()["y"].to_vec::<f32>().unwrap(),
        vec![3.0, 6.0]
    );
    let e = save(&path, [("y", &y), ("y", &y)]).unwrap_err().to_string();
    assert!(
        e.contains("\"y\"") && e.contains("twice") && e.contains("t.safetensors"),
        "{e}"
    );
}

#[test]
fn overwriting_a_mapped_file_keeps_old_tensors_valid() {
    let (_d, path) = tmp();
    let t = Tensor::from_vec(vec![1f32; 1024], &[1024]).unwrap();
    save(&path, [("w", &t)]).unwrap();
    let old = SafeTensorsFile::open(&path).unwrap().get("w").unwrap();
    let t2 = Tensor::from_vec(vec![2f32; 16], &[16]).unwrap();
    save(&path, [("w", &t2)]).unwrap();
    assert_eq!(old.to_vec::<f32>().unwrap(), vec![1f32; 1024]);
    assert_eq!(
        load(&path).unwrap()["w"].to_vec::<f32>().unwrap(),
        vec![2f32; 16]
    );
}

#[test]
fn misaligned_tensor_is_copied_with_correct_values() {
    let (_d, path) = tmp();
    let x: [f32; 2] = [1.5, -2.25];
    let mut data = vec![7u8];
    data.extend_from_slice(bytemuck::cast_slice(&x));
    let header = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"b":{"dtype":"F32","shape":[2],"data_offsets":[1,9]}}"#;
    write_raw(&path, header, &data);
    let f = SafeTensorsFile::open(&path).unwrap();
    let b = f.get("b").unwrap();
    assert!(
        !b.cpu_storage().is_mapped(),
        "an unaligned f32 window must be copied"
    );
    assert_eq!(b.to_vec::<f32>().unwrap(), x.to_vec());
    assert!(f.get("a").unwrap().cpu_storage().is_mapped());
    assert_eq!(f.get_vec::<u8>("a").unwrap(), vec![7]);
}

#[test]
fn typed_access_error_names_the_tensor() {
    let (_d, path) = tmp();
    save(
        &path,
        [("ids", &Tensor::from_vec(vec![1i64, 2], &[2]).unwrap())],
    )
    .unwrap();
    let f = SafeTensorsFile::open(&path).unwrap();
    let e = f.get_typed::<f32>("ids").unwrap_err().to_string();
    assert!(
        e.contains("\"ids\"")
            && e.contains("i64")
            && e.contains("f32")
            && e.contains("t.safetensors"),
        "{e}"
    );
    let e = f.get("nope").unwrap_err();
    assert!(matches!(e, Error::TensorNotFound { .. }));
    assert!(
        e.to_string().contains("nope") && e.to_string().contains("t.safetensors"),
        "{e}"
    );
}

#[test]
fn truncated_file_error_names_file_and_tensor() {
    let (_d, path) = tmp();
    let t = Tensor::from_vec(vec![0f32; 16], &[16]).unwrap();
    save(&path, [("weight", &t)]).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
    let e = err_of(&path);
    assert!(
        e.contains("t.safetensors") && e.contains("\"weight\"") && e.contains("truncated"),
        "{e}"
    );
    // cut inside the header, and below the length field
    std::fs::write(&path, &bytes[..20]).unwrap();
    let e = err_of(&path);
    assert!(
        e.contains("t.safetensors") && e.contains("truncated"),
        "{e}"
    );
    std::fs::write(&path, &bytes[..3]).unwrap();
    let e = err_of(&path);
    assert!(
        e.contains("t.safetensors") && e.contains("truncated"),
        "{e}"
    );
}

#[test]
fn corrupt_header_errors_name_file_and_tensor() {
    let (_d, path) = tmp();
    write_raw(
        &path,
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]"#,
        &[0; 8],
    );
    let e = err_of(&path);
    assert!(
        e.contains("t.safetensors") && e.contains("invalid JSON"),
        "{e}"
    );

    write_raw(
        &path,
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#,
        &[0; 12],
    );
    let e = err_of(&path);
    assert!(e.contains("\"b\"") && e.contains("out of range"), "{e}");

    write_raw(
        &path,
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
        &[0; 12],
    );
    let e = err_of(&path);
    assert!(
        e.contains("\"b\"") && e.contains("overlap") && e.contains("\"a\""),
        "{e}"
    );

    write_raw(
        &path,
        r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
        &[0; 8],
    );
    let e = err_of(&path);
    assert!(
        e.contains("\"a\"") && e.contains("size mismatch") && e.contains("[3]"),
        "{e}"
    );

    write_raw(
        &path,
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}"#,
        &[0; 8],
    );
    let e = err_of(&path);
    assert!(e.contains("\"a\"") && e.contains("t.safetensors"), "{e}");

    write_raw(
        &path,
        r#"{"a":{"dtype":"F32","shape":[4611686018427387904, 8],"data_offsets":[0,8]}}"#,
        &[0; 8],
    );
    let e = err_of(&path);
    assert!(e.contains("\"a\"") && e.contains("overflow"), "{e}");

    write_raw(
        &path,
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
        &[0; 9],
    );
    let e = err_of(&path);
    assert!(e.contains("t.safetensors") && e.contains("trailing"), "{e}");

    write_raw(&path, r#"{"a":{"dtype":"F32","shape":[2]}}"#, &[0; 8]);
    let e = err_of(&path);
    assert!(e.contains("\"a\"") && e.contains("data_offsets"), "{e}");

    write_raw(&path, r#"[1, 2]"#, &[]);
    let e = err_of(&path);
    assert!(e.contains("t.safetensors") && e.contains("JSON"), "{e}");

    let mut bytes = u64::MAX.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    std::fs::write(&path, bytes).unwrap();
    let e = err_of(&path);
    assert!(
        e.contains("t.safetensors") && e.contains("header length"),
        "{e}"
    );
}

#[test]
fn unsupported_dtypes_are_named_with_the_supported_list() {
    let (_d, path) = tmp();
    for dt in ["BOOL", "I8", "F8_E4M3", "I32", "U64", "Q4_K"] {
        write_raw(
            &path,
            &format!(r#"{{"mask":{{"dtype":"{dt}","shape":[4],"data_offsets":[0,4]}}}}"#),
            &[0; 4],
        );
        let e = SafeTensorsFile::open(&path).unwrap_err();
        assert!(
            matches!(&e, Error::SafeTensors { tensor: Some(t), .. } if t == "mask"),
            "{dt}: {e:?}"
        );
        let e = e.to_string();
        assert!(
            e.contains("t.safetensors") && e.contains("\"mask\"") && e.contains(dt),
            "{dt}: {e}"
        );
        assert!(e.contains("F32, F64, F16, BF16, I64, U32, U8"), "{dt}: {e}");
    }
}

#[test]
fn empty_file_list_and_metadata_only_files_load() {
    let (_d, path) = tmp();
    save(&path, std::iter::empty::<(&str, &Tensor)>()).unwrap();
    let f = SafeTensorsFile::open(&path).unwrap();
    assert!(f.is_empty());
    write_raw(&path, r#"{"__metadata__":{"format":"pt","x":"y"}}"#, &[]);
    let f = SafeTensorsFile::open(&path).unwrap();
    assert_eq!(f.metadata()["x"], "y");
    write_raw(&path, r#"{"__metadata__":{"format":3}}"#, &[]);
    assert!(err_of_open(&path).contains("__metadata__"));
}

fn err_of_open(path: &Path) -> String {
    SafeTensorsFile::open(path).unwrap_err().to_string()
}

/// A small valid file with several dtypes, as bytes.
fn valid_file_bytes(path: &Path) -> Vec<u8> {
    let a = Tensor::from_vec(vec![1f32, 2., 3., 4., 5., 6.], &[2, 3]).unwrap();
    let b = Tensor::from_vec(vec![7i64, 8], &[2]).unwrap();
    let c = Tensor::from_vec(vec![1u8, 2, 3], &[3, 1]).unwrap();
    let d = Tensor::zeros(&[2, 2], DType::BF16, Device::Cpu).unwrap();
    save(path, [("a", &a), ("b", &b), ("c", &c), ("d", &d)]).unwrap();
    std::fs::read(path).unwrap()
}

#[derive(Debug, Clone)]
enum Corruption {
    Truncate(usize),
    Flip(usize, u8),
    /// Replace a byte of the header by an ASCII char that keeps JSON plausible.
    HeaderChar(usize, char),
    Append(Vec<u8>),
    HeaderLen(u64),
}

fn corruption() -> impl Strategy<Value = Corruption> {
    prop_oneof![
        (0usize..400).prop_map(Corruption::Truncate),
        (0usize..400, any::<u8>()).prop_map(|(i, b)| Corruption::Flip(i, b)),
        (
            0usize..400,
            prop::sample::select(vec![
                '0', '1', '9', ',', '[', ']', '{', '}', '"', '-', ' ', 'e', '.'
            ])
        )
            .prop_map(|(i, c)| Corruption::HeaderChar(i, c)),
        prop::collection::vec(any::<u8>(), 1..16).prop_map(Corruption::Append),
        prop_oneof![Just(0u64), Just(1), Just(u64::MAX), 0u64..600].prop_map(Corruption::HeaderLen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    /// Any corruption yields Ok or Err, never a panic (proptest reports a panic as a failure),
    /// and every error names the file.
    #[test]
    fn corrupted_files_never_panic(cs in prop::collection::vec(corruption(), 1..4)) {
        let (_d, path) = tmp();
        let mut bytes = valid_file_bytes(&path);
        let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        for c in cs {
            match c {
                Corruption::Truncate(n) => bytes.truncate(n.min(bytes.len())),
                Corruption::Flip(i, b) => { if !bytes.is_empty() { let i = i % bytes.len(); bytes[i] ^= b; } }
                Corruption::HeaderChar(i, ch) => {
                    let end = header_end.min(bytes.len());
                    if end > 8 { let i = 8 + i % (end - 8); bytes[i] = ch as u8; }
                }
                Corruption::Append(v) => bytes.extend_from_slice(&v),
                Corruption::HeaderLen(n) => { if bytes.len() >= 8 { bytes[..8].copy_from_slice(&n.to_le_bytes()); } }
            }
        }
        std::fs::write(&path, &bytes).unwrap();
        match SafeTensorsFile::open(&path) {
            Err(e) => prop_assert!(e.to_string().contains("t.safetensors"), "{}", e),
            Ok(f) => {
                for n in f.names() {
                    if let Ok(t) = f.get(n) {
                        // reading every element must stay in bounds
                        let v = t.to_vec_f64().unwrap();
                        prop_assert_eq!(v.len(), t.numel());
                    }
                    let _ = f.get_typed::<f32>(n);
                }
            }
        }
    }
}

/// `Residency::Resident` reads the same tensors as the map, holds its own copy (rewriting the
/// file in place afterwards changes nothing it returns), and validates the header the same way.
#[test]
fn resident_file_is_a_copy_with_the_same_tensors() {
    use mgm_tensor::safetensors::Residency;
    let (_d, path) = tmp();
    let tensors: Vec<(String, Tensor)> = ALL
        .iter()
        .enumerate()
        .map(|(i, &dt)| {
            let t = Tensor::from_vec(exact_values(i as u64, 24, dt), &[4, 6])
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            (format!("t{i}"), t)
        })
        .collect();
    save(&path, tensors.iter().map(|(n, t)| (n.as_str(), t))).unwrap();
    let mapped = SafeTensorsFile::open(&path).unwrap();
    let resident = SafeTensorsFile::open_with(&path, Residency::Resident).unwrap();
    for (name, _) in &tensors {
        let (a, b) = (mapped.get(name).unwrap(), resident.get(name).unwrap());
        assert_eq!(a.dtype(), b.dtype());
        assert_eq!(
            a.to_dtype(DType::F64).unwrap().to_vec::<f64>().unwrap(),
            b.to_dtype(DType::F64).unwrap().to_vec::<f64>().unwrap(),
            "{name}"
        );
    }
    let before = resident.get("t0").unwrap().to_vec::<f32>().unwrap();
    drop(mapped);
    let zeros = Tensor::from_vec(vec![0f32; 24], &[4, 6]).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let (_d2, other) = tmp();
    save(&other, [("t0", &zeros)]).unwrap();
    std::fs::write(&path, std::fs::read(&other).unwrap()).unwrap(); // same inode, new bytes
    assert_eq!(resident.get("t0").unwrap().to_vec::<f32>().unwrap(), before);
    // a truncated file is the same error either way
    std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
    let e = SafeTensorsFile::open_with(&path, Residency::Resident).unwrap_err();
    let m = SafeTensorsFile::open(&path).unwrap_err();
    assert_eq!(e.to_string(), m.to_string());
}
