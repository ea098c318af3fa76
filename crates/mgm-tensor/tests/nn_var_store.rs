//! VarStore: sharded loading by dotted names, missing/unexpected/shape errors that name the
//! parameters, dtype conversion, and trainable vars initialised from files or initialisers.
mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use mgm_tensor::nn::{Init, Param, VarStore};
use mgm_tensor::safetensors::save;
use mgm_tensor::{DType, Error, Tensor};

fn t(v: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape).unwrap()
}

/// Two shards of a tiny "model": the encoder in one file, the head in the other.
fn write_shards(dir: &Path) -> (PathBuf, PathBuf) {
    let a = dir.join("model-00001-of-00002.safetensors");
    let b = dir.join("model-00002-of-00002.safetensors");
    save(
        &a,
        [
            (
                "encoder.layers.0.weight",
                &t(&[1., 2., 3., 4., 5., 6.], &[2, 3]),
            ),
            ("encoder.layers.0.bias", &t(&[0.5, -0.5], &[2])),
            ("encoder.layers.1.weight", &t(&[1., 0., 0., 1.], &[2, 2])),
        ],
    )
    .unwrap();
    save(
        &b,
        [
            ("head.weight", &t(&[7., 8.], &[1, 2])),
            (
                "position_ids",
                &Tensor::from_vec(vec![0i64, 1, 2], &[1, 3]).unwrap(),
            ),
        ],
    )
    .unwrap();
    (a, b)
}

#[test]
fn sharded_checkpoint_loads_by_dotted_names() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = write_shards(dir.path());
    let vs = VarStore::from_safetensors(&[&a, &b]).unwrap();
    let l0 = vs.pp("encoder").pp("layers.0");
    assert_eq!(l0.prefix(), "encoder.layers.0");
    let w = l0.get("weight", &[2, 3]).unwrap();
    assert_eq!(w.to_vec::<f32>().unwrap(), vec![1., 2., 3., 4., 5., 6.]);
    assert!(
        w.cpu_storage().is_mapped(),
        "frozen parameters are read from the map"
    );
    assert_eq!(
        l0.get("bias", &[2]).unwrap().to_vec::<f32>().unwrap(),
        vec![0.5, -0.5]
    );
    assert_eq!(
        vs.get("encoder.layers.1.weight", &[2, 2]).unwrap().shape(),
        &[2, 2]
    );
    assert_eq!(
        vs.pp("head")
            .get("weight", &[1, 2])
            .unwrap()
            .to_vec::<f32>()
            .unwrap(),
        vec![7., 8.]
    );
    assert!(vs.contains("position_ids"));
    assert_eq!(vs.shape_of("position_ids"), Some(vec![1, 3]));
    // position_ids unused so far
    let e = vs.finish().unwrap_err();
    assert!(
        matches!(&e, Error::MissingOrUnexpected { missing, unexpected, .. } if missing.is_empty() && unexpected == &["position_ids"]),
        "{e:?}"
    );
    vs.finish_ignoring(|n| n.ends_with("position_ids")).unwrap();
    assert_eq!(
        vs.get_any_shape("position_ids")
            .unwrap()
            .to_vec::<i64>()
            .unwrap(),
        vec![0, 1, 2]
    );
    vs.finish().unwrap();
    vs.check_unused().unwrap();
}

#[test]
fn missing_and_unexpected_names_are_reported_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = write_shards(dir.path());
    let vs = VarStore::from_safetensors(&[a, b]).unwrap();
    let e = vs.pp("encoder.layers.0").get("gamma", &[2]).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::TensorNotFound { .. }));
    assert!(
        msg.contains("encoder.layers.0.gamma") && msg.contains("model-00001-of-00002.safetensors"),
        "{msg}"
    );
    vs.get("encoder.layers.0.weight", &[2, 3]).unwrap();
    let e = vs.check_unused().unwrap_err().to_string();
    assert!(
        e.contains("unexpected parameters: encoder.layers.0.bias, encoder.layers.1.weight, head.weight, position_ids"),
        "{e}"
    );
    assert!(!e.contains("missing"), "{e}");
    let e = vs.finish().unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("missing parameters: encoder.layers.0.gamma"),
        "{msg}"
    );
    assert!(
        msg.contains("unexpected parameters: encoder.layers.0.bias"),
        "{msg}"
    );
    assert_eq!(vs.missing(), vec!["encoder.layers.0.gamma".to_string()]);
}

#[test]
fn shape_mismatch_names_parameter_shapes_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = write_shards(dir.path());
    let vs = VarStore::from_safetensors(&[a, b]).unwrap();
    let e = vs.pp("head").get("weight", &[2, 1]).unwrap_err();
    assert!(
        matches!(&e, Error::ParameterShape { name, expected, actual, .. }
        if name == "head.weight" && expected == &[2, 1] && actual == &[1, 2])
    );
    let msg = e.to_string();
    assert!(
        msg.contains("head.weight") && msg.contains("[2, 1]") && msg.contains("[1, 2]"),
        "{msg}"
    );
    assert!(msg.contains("model-00002-of-00002.safetensors"), "{msg}");
}

#[test]
fn overlapping_shards_are_rejected_with_both_files() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _) = write_shards(dir.path());
    let c = dir.path().join("again.safetensors");
    save(&c, [("encoder.layers.1.weight", &t(&[1.], &[1]))]).unwrap();
    let e = VarStore::from_safetensors(&[a, c]).unwrap_err().to_string();
    assert!(
        e.contains("encoder.layers.1.weight")
            && e.contains("again.safetensors")
            && e.contains("model-00001"),
        "{e}"
    );
}

#[test]
fn index_json_lists_the_shards() {
    let dir = tempfile::tempdir().unwrap();
    write_shards(dir.path());
    let idx = dir.path().join("model.safetensors.index.json");
    let json = r#"{"metadata":{"total_size":0},"weight_map":{
        "encoder.layers.0.weight":"model-00001-of-00002.safetensors",
        "encoder.layers.0.bias":"model-00001-of-00002.safetensors",
        "encoder.layers.1.weight":"model-00001-of-00002.safetensors",
        "head.weight":"model-00002-of-00002.safetensors",
        "position_ids":"model-00002-of-00002.safetensors"}}"#;
    std::fs::write(&idx, json).unwrap();
    let vs = VarStore::from_safetensors_index(&idx).unwrap();
    assert_eq!(vs.checkpoint_names().len(), 5);
    assert_eq!(
        vs.get("head.weight", &[1, 2])
            .unwrap()
            .to_vec::<f32>()
            .unwrap(),
        vec![7., 8.]
    );
    // an index naming a tensor that no shard holds
    std::fs::write(&idx, json.replace("\"position_ids\"", "\"lm_head.weight\"")).unwrap();
    let e = VarStore::from_safetensors_index(&idx)
        .unwrap_err()
        .to_string();
    assert!(e.contains("lm_head.weight"), "{e}");
}

#[test]
fn dtype_conversion_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = write_shards(dir.path());
    let vs = VarStore::from_safetensors(&[a, b])
        .unwrap()
        .with_dtype(DType::BF16);
    let w = vs.pp("head").get("weight", &[1, 2]).unwrap();
    assert_eq!(w.dtype(), DType::BF16);
    assert_eq!(w.to_vec_f64().unwrap(), vec![7., 8.]);
    // integer buffers are left alone by the store-wide dtype ...
    assert_eq!(vs.get("position_ids", &[1, 3]).unwrap().dtype(), DType::I64);
    // ... but converted when asked explicitly
    let p = vs
        .get_with_dtype("position_ids", &[1, 3], DType::F32)
        .unwrap();
    assert_eq!(p.to_vec::<f32>().unwrap(), vec![0., 1., 2.]);
    let f = vs
        .get_with_dtype("encoder.layers.0.bias", &[2], DType::F64)
        .unwrap();
    assert_eq!(f.to_vec::<f64>().unwrap(), vec![0.5, -0.5]);
}

#[test]
fn trainable_store_initialises_from_file_and_from_init() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = write_shards(dir.path());
    let vs = VarStore::from_safetensors(&[a, b]).unwrap().trainable(7);
    assert!(vs.is_trainable());
    let w = vs.pp("head").param("weight", &[1, 2]).unwrap();
    let Param::Trainable(var) = &w else {
        panic!("a trainable store makes Vars")
    };
    assert_eq!(var.as_tensor().to_vec::<f32>().unwrap(), vec![7., 8.]);
    // the same name gives the same Var (weight tying)
    let again = vs.param("head.weight", &[1, 2]).unwrap();
    assert_eq!(again.var().unwrap().as_tensor().id(), var.as_tensor().id());
    // names the file lacks come from the init, seeded by name
    let g = vs
        .pp("norm")
        .param_or_init("weight", &[4], Init::Ones)
        .unwrap();
    assert_eq!(g.tensor().to_vec::<f32>().unwrap(), vec![1.; 4]);
    let k = vs
        .param_or_init("new.weight", &[3, 8], Init::KaimingUniform)
        .unwrap();
    let kv = k.tensor().to_vec::<f32>().unwrap();
    let bound = 1.0 / 8f32.sqrt();
    assert!(kv.iter().all(|x| x.abs() <= bound) && kv.iter().any(|x| *x != 0.0));
    let n = vs
        .param_or_init(
            "noise",
            &[1000],
            Init::Normal {
                mean: 1.0,
                std: 0.5,
            },
        )
        .unwrap();
    let nv = n.tensor().to_vec::<f32>().unwrap();
    let mean = nv.iter().sum::<f32>() / 1000.0;
    assert!((mean - 1.0).abs() < 0.1, "mean {mean}");
    // a missing name without an init is an error naming it
    let e = vs.param("absent", &[1]).unwrap_err().to_string();
    assert!(e.contains("absent"), "{e}");

    let names: Vec<String> = vs.all_vars().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        vec!["head.weight", "norm.weight", "new.weight", "noise"]
    );

    // the same seed gives the same init, another seed another one
    let vs2 = VarStore::new_trainable(7);
    let k2 = vs2
        .param_or_init("new.weight", &[3, 8], Init::KaimingUniform)
        .unwrap();
    assert_eq!(k2.tensor().to_vec::<f32>().unwrap(), kv);
    let vs3 = VarStore::new_trainable(8);
    let k3 = vs3
        .param_or_init("new.weight", &[3, 8], Init::KaimingUniform)
        .unwrap();
    assert_ne!(k3.tensor().to_vec::<f32>().unwrap(), kv);

    // gradients reach the vars, and a Param reads the Var's current value
    let loss = w.tensor().sqr().unwrap().sum_all().unwrap();
    loss.backward().unwrap();
    assert_eq!(var.grad().unwrap().to_vec::<f32>().unwrap(), vec![14., 16.]);
    var.set(&t(&[1., 1.], &[1, 2])).unwrap();
    assert_eq!(w.tensor().to_vec::<f32>().unwrap(), vec![1., 1.]);

    // a shape clash with an existing var names it
    let e = vs.param("head.weight", &[2]).unwrap_err().to_string();
    assert!(
        e.contains("head.weight") && e.contains("[2]") && e.contains("[1, 2]"),
        "{e}"
    );
}

#[test]
fn trained_vars_save_and_reload() {
    let dir = tempfile::tempdir().unwrap();
    let vs = VarStore::new_trainable(1).with_dtype(DType::F64);
    let p = vs
        .pp("lin")
        .param_or_init("weight", &[2, 3], Init::Uniform { lo: -1.0, hi: 1.0 })
        .unwrap();
    assert_eq!(p.tensor().dtype(), DType::F64);
    let path = dir.path().join("trained.safetensors");
    vs.save_vars(&path).unwrap();
    let back = VarStore::from_safetensors(&[&path]).unwrap();
    assert_eq!(
        back.get("lin.weight", &[2, 3])
            .unwrap()
            .to_vec::<f64>()
            .unwrap(),
        p.tensor().to_vec::<f64>().unwrap()
    );
    back.finish().unwrap();
}

#[test]
fn in_memory_store_works_like_a_file() {
    let mut m = HashMap::new();
    m.insert("a.b".to_string(), t(&[1., 2.], &[2]));
    let vs = VarStore::from_tensors(m).unwrap();
    assert_eq!(
        vs.pp("a").get("b", &[2]).unwrap().to_vec::<f32>().unwrap(),
        vec![1., 2.]
    );
    let e = vs.get("a.c", &[2]).unwrap_err().to_string();
    assert!(e.contains("a.c") && e.contains("in-memory"), "{e}");
    vs.check_unused().unwrap();
    assert!(
        vs.finish()
            .unwrap_err()
            .to_string()
            .contains("missing parameters: a.c")
    );
}
