//! [`VarStore`]: parameters by dotted name, from safetensors checkpoints or fresh initialisers.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::safetensors::{Residency, SafeTensorsFile};
use crate::{DType, Device, Error, Result, Tensor, Var};

/// How a trainable parameter that the checkpoint lacks is initialised.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// All zeros.
    Zeros,
    /// All ones.
    Ones,
    /// Every element `v`.
    Const(f64),
    /// Normal samples with the given mean and standard deviation.
    Normal {
        /// Mean.
        mean: f64,
        /// Standard deviation.
        std: f64,
    },
    /// Uniform samples in `[lo, hi)`.
    Uniform {
        /// Lower bound.
        lo: f64,
        /// Upper bound.
        hi: f64,
    },
    /// PyTorch's default for `nn.Linear`/`nn.Conv2d` weights, `kaiming_uniform_(a = sqrt(5))`:
    /// uniform in `[-1/sqrt(fan_in), 1/sqrt(fan_in))` with `fan_in = shape[1] * prod(shape[2..])`.
    KaimingUniform,
}

impl Init {
    /// A tensor of `shape` drawn from this init; `seed` makes it reproducible.
    pub fn tensor(self, shape: &[usize], dtype: DType, seed: u64) -> Result<Tensor> {
        let dev = Device::Cpu;
        match self {
            Init::Zeros => Tensor::zeros(shape, dtype, dev),
            Init::Ones => Tensor::ones(shape, dtype, dev),
            Init::Const(v) => Tensor::full(v, shape, dtype, dev),
            Init::Normal { mean, std } => Tensor::randn(seed, shape, mean, std, dtype, dev),
            Init::Uniform { lo, hi } if lo == hi => Tensor::full(lo, shape, dtype, dev),
            Init::Uniform { lo, hi } => Tensor::rand_uniform(seed, shape, lo, hi, dtype, dev),
            Init::KaimingUniform => {
                let fan_in = match shape {
                    [] => 1,
                    [n] => *n,
                    [_, i, rest @ ..] => i * rest.iter().product::<usize>(),
                };
                if fan_in == 0 {
                    // torch warns and leaves such a tensor empty; nothing to draw either way
                    return Tensor::zeros(shape, dtype, dev);
                }
                let bound = 1.0 / (fan_in as f64).sqrt();
                Tensor::rand_uniform(seed, shape, -bound, bound, dtype, dev)
            }
        }
    }
}

/// A parameter as a layer holds it: a fixed tensor (inference) or a [`Var`] whose current value
/// is read at every forward (training, where an optimizer replaces the value).
#[derive(Clone, Debug)]
pub enum Param {
    /// A constant tensor (loaded for inference).
    Frozen(Tensor),
    /// A trainable leaf.
    Trainable(Var),
}

impl Param {
    /// The current value; tracked for autograd when trainable.
    pub fn tensor(&self) -> Tensor {
        match self {
            Param::Frozen(t) => t.clone(),
            Param::Trainable(v) => v.as_tensor(),
        }
    }

    /// The shape.
    pub fn shape(&self) -> Vec<usize> {
        match self {
            Param::Frozen(t) => t.shape().to_vec(),
            Param::Trainable(v) => v.shape(),
        }
    }

    /// The `Var`, when trainable.
    pub fn var(&self) -> Option<&Var> {
        match self {
            Param::Frozen(_) => None,
            Param::Trainable(v) => Some(v),
        }
    }
}

impl From<Tensor> for Param {
    fn from(t: Tensor) -> Self {
        Param::Frozen(t)
    }
}

impl From<Var> for Param {
    fn from(v: Var) -> Self {
        Param::Trainable(v)
    }
}

enum Source {
    File(SafeTensorsFile),
    Memory(HashMap<String, Tensor>),
}

impl Source {
    fn desc(&self) -> String {
        match self {
            Source::File(f) => f.path().display().to_string(),
            Source::Memory(_) => "<in-memory tensors>".to_string(),
        }
    }

    fn get(&self, name: &str) -> Result<Tensor> {
        match self {
            Source::File(f) => f.get(name),
            Source::Memory(m) => m.get(name).cloned().ok_or_else(|| Error::TensorNotFound {
                name: name.to_string(),
                source_desc: self.desc(),
            }),
        }
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        match self {
            Source::File(f) => f.info(name).map(|(_, s)| s.to_vec()),
            Source::Memory(m) => m.get(name).map(|t| t.shape().to_vec()),
        }
    }
}

/// The checkpoint files (or tensors) and an index from name to the one that holds it.
struct Sources {
    list: Vec<Source>,
    index: HashMap<String, usize>,
}

impl Sources {
    fn new(list: Vec<Source>) -> Result<Self> {
        let mut index: HashMap<String, usize> = HashMap::new();
        for (i, s) in list.iter().enumerate() {
            let names: Vec<String> = match s {
                Source::File(f) => f.names().into_iter().map(str::to_string).collect(),
                Source::Memory(m) => m.keys().cloned().collect(),
            };
            for n in names {
                if let Some(&j) = index.get(&n) {
                    return Err(Error::SafeTensors {
                        path: s.desc(),
                        tensor: Some(n),
                        msg: format!(
                            "the tensor is also in {}; shards must not overlap",
                            list[j].desc()
                        ),
                    });
                }
                index.insert(n, i);
            }
        }
        Ok(Sources { list, index })
    }

    fn desc(&self) -> String {
        if self.list.is_empty() {
            return "<no checkpoint>".to_string();
        }
        self.list
            .iter()
            .map(Source::desc)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[derive(Default)]
struct State {
    used: HashSet<String>,
    missing: BTreeSet<String>,
    vars: Vec<(String, Var)>,
    var_index: HashMap<String, usize>,
}

struct Inner {
    sources: Arc<Sources>,
    trainable: Option<u64>,
    state: Mutex<State>,
}

/// Parameters by dotted name, loaded from one or more safetensors files (a sharded checkpoint)
/// or created trainable. Cloning is cheap; [`VarStore::pp`] returns a handle under a name prefix
/// that shares the same store, so layers load by the checkpoint's own names:
///
/// ```no_run
/// # use mgm_tensor::nn::VarStore;
/// let vs = VarStore::from_safetensors(&["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])?;
/// let q = vs.pp("model.layers.0").pp("self_attn.q_proj").get("weight", &[64, 64])?;
/// vs.finish()?; // every tensor of the checkpoint was used, none was missing
/// # Ok::<(), mgm_tensor::Error>(())
/// ```
///
/// The store records which names were used; [`VarStore::finish`] reports names the model asked
/// for that the checkpoint lacks and names the checkpoint has that the model never asked for.
/// In trainable mode ([`VarStore::trainable`]) each parameter becomes a [`Var`], initialised from
/// the checkpoint when it has the name and from an [`Init`] otherwise, and
/// [`VarStore::all_vars`] lists them for an optimizer.
#[derive(Clone)]
pub struct VarStore {
    inner: Arc<Inner>,
    prefix: String,
    dtype: Option<DType>,
}

impl std::fmt::Debug for VarStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "VarStore({}, prefix {:?})",
            self.inner.sources.desc(),
            self.prefix
        )
    }
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    // A panic while holding the lock leaves only bookkeeping sets behind, which stay valid.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// FNV-1a of the name mixed into the store seed: each parameter's init depends on its name only,
/// not on the order layers are built in.
fn name_seed(seed: u64, name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl VarStore {
    fn from_sources(list: Vec<Source>) -> Result<Self> {
        Ok(VarStore {
            inner: Arc::new(Inner {
                sources: Arc::new(Sources::new(list)?),
                trainable: None,
                state: Mutex::new(State::default()),
            }),
            prefix: String::new(),
            dtype: None,
        })
    }

    /// A store reading from safetensors files (several for a sharded checkpoint; a name present
    /// in two shards is an error). Tensors are memory-mapped, not copied.
    pub fn from_safetensors<P: AsRef<Path>>(paths: &[P]) -> Result<Self> {
        Self::from_safetensors_with(paths, Residency::Mapped)
    }

    /// [`VarStore::from_safetensors`] with the files' bytes held as `residency` says.
    pub fn from_safetensors_with<P: AsRef<Path>>(
        paths: &[P],
        residency: Residency,
    ) -> Result<Self> {
        let files = paths
            .iter()
            .map(|p| SafeTensorsFile::open_with(p, residency).map(Source::File))
            .collect::<Result<Vec<_>>>()?;
        Self::from_sources(files)
    }

    /// A store reading the shards listed in a `model.safetensors.index.json` (its `weight_map`),
    /// resolved relative to the index file's directory.
    pub fn from_safetensors_index(index: impl AsRef<Path>) -> Result<Self> {
        Self::from_safetensors_index_with(index, Residency::Mapped)
    }

    /// [`VarStore::from_safetensors_index`] with the shards' bytes held as `residency` says.
    pub fn from_safetensors_index_with(
        index: impl AsRef<Path>,
        residency: Residency,
    ) -> Result<Self> {
        let index = index.as_ref();
        let desc = index.display().to_string();
        let bad = |msg: String| Error::SafeTensors {
            path: desc.clone(),
            tensor: None,
            msg,
        };
        let text = std::fs::read_to_string(index).map_err(|source| Error::Io {
            path: desc.clone(),
            source,
        })?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("invalid index JSON ({e})")))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| bad("index has no \"weight_map\" object".to_string()))?;
        let dir = index.parent().unwrap_or_else(|| Path::new("."));
        let mut files = BTreeSet::new();
        for (name, file) in map {
            let file = file
                .as_str()
                .ok_or_else(|| bad(format!("weight_map entry {name:?} is not a file name")))?;
            files.insert(file.to_string());
        }
        let paths: Vec<_> = files.iter().map(|f| dir.join(f)).collect();
        let vs = Self::from_safetensors_with(&paths, residency)?;
        for (name, file) in map {
            if !vs.inner.sources.index.contains_key(name) {
                return Err(Error::TensorNotFound {
                    name: name.clone(),
                    source_desc: format!(
                        "{} (listed in {desc})",
                        dir.join(file.as_str().unwrap_or("")).display()
                    ),
                });
            }
        }
        Ok(vs)
    }

    /// A store over tensors already in memory (tests, converted checkpoints).
    pub fn from_tensors(tensors: HashMap<String, Tensor>) -> Result<Self> {
        Self::from_sources(vec![Source::Memory(tensors)])
    }

    /// An empty trainable store: every parameter is created from its [`Init`], seeded from
    /// `seed` and the parameter's full name.
    pub fn new_trainable(seed: u64) -> Self {
        Self::from_sources(Vec::new())
            .expect("no sources cannot overlap")
            .trainable(seed)
    }

    /// A trainable store over the same checkpoint: parameters become [`Var`]s initialised from
    /// the checkpoint (copied) or, for names it lacks, from their [`Init`] seeded from `seed`
    /// and the name. The new store starts with fresh used/missing bookkeeping and no vars.
    pub fn trainable(&self, seed: u64) -> Self {
        VarStore {
            inner: Arc::new(Inner {
                sources: self.inner.sources.clone(),
                trainable: Some(seed),
                state: Mutex::new(State::default()),
            }),
            prefix: self.prefix.clone(),
            dtype: self.dtype,
        }
    }

    /// True when parameters are created as [`Var`]s.
    pub fn is_trainable(&self) -> bool {
        self.inner.trainable.is_some()
    }

    /// The same store, converting float parameters to `dtype` when they are loaded (integer
    /// tensors are left alone, as `model.to(dtype)` does). Trainable stores also create fresh
    /// parameters in this dtype (f32 when unset).
    pub fn with_dtype(&self, dtype: DType) -> Self {
        VarStore {
            inner: self.inner.clone(),
            prefix: self.prefix.clone(),
            dtype: Some(dtype),
        }
    }

    /// The dtype parameters are converted to, if one was set.
    pub fn dtype(&self) -> Option<DType> {
        self.dtype
    }

    /// The handle for the names under `name` (`vs.pp("encoder").pp("layers.0")` reads
    /// `encoder.layers.0.*`).
    pub fn pp(&self, name: &str) -> Self {
        VarStore {
            inner: self.inner.clone(),
            prefix: self.full_name(name),
            dtype: self.dtype,
        }
    }

    /// The prefix of this handle (empty at the root).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `prefix.name`, the name as the checkpoint spells it.
    pub fn full_name(&self, name: &str) -> String {
        match (self.prefix.is_empty(), name.is_empty()) {
            (true, _) => name.to_string(),
            (false, true) => self.prefix.clone(),
            (false, false) => format!("{}.{}", self.prefix, name),
        }
    }

    /// True when the checkpoint has `name` (under this prefix) or a var of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        let full = self.full_name(name);
        self.inner.sources.index.contains_key(&full)
            || lock(&self.inner.state).var_index.contains_key(&full)
    }

    /// The shape of `name` in the checkpoint, without loading it.
    pub fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        let full = self.full_name(name);
        let &i = self.inner.sources.index.get(&full)?;
        self.inner.sources.list[i].shape(&full)
    }

    /// The names the checkpoint holds, sorted.
    pub fn checkpoint_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.inner.sources.index.keys().cloned().collect();
        v.sort();
        v
    }

    /// Loads `full` from the checkpoint, marking it used (or missing), converting floats to the
    /// handle's dtype and checking the shape when one is given.
    fn load(
        &self,
        full: &str,
        shape: Option<&[usize]>,
        dtype: Option<DType>,
        always_cast: bool,
    ) -> Result<Option<Tensor>> {
        let sources = &self.inner.sources;
        let Some(&i) = sources.index.get(full) else {
            return Ok(None);
        };
        let src = &sources.list[i];
        let t = src.get(full)?;
        if let Some(shape) = shape
            && t.shape() != shape
        {
            return Err(Error::ParameterShape {
                name: full.to_string(),
                expected: shape.to_vec(),
                actual: t.shape().to_vec(),
                path: src.desc(),
            });
        }
        lock(&self.inner.state).used.insert(full.to_string());
        let t = match dtype {
            Some(d)
                if d != t.dtype() && (always_cast || (d.is_float() && t.dtype().is_float())) =>
            {
                t.to_dtype(d)?
            }
            _ => t,
        };
        Ok(Some(t))
    }

    fn not_found(&self, full: &str) -> Error {
        lock(&self.inner.state).missing.insert(full.to_string());
        Error::TensorNotFound {
            name: full.to_string(),
            source_desc: self.inner.sources.desc(),
        }
    }

    /// The parameter `name` with the expected shape (an error names the parameter, both shapes
    /// and the file when they differ), converted to the handle's dtype if one was set. In a
    /// trainable store this is the current value of the parameter's [`Var`].
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        if self.is_trainable() {
            return self.param(name, shape).map(|p| p.tensor());
        }
        let full = self.full_name(name);
        self.load(&full, Some(shape), self.dtype, false)?
            .ok_or_else(|| self.not_found(&full))
    }

    /// Like [`VarStore::get`], converted to `dtype` whatever the stored dtype (integers too).
    pub fn get_with_dtype(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        if self.is_trainable() {
            return self
                .with_dtype(dtype)
                .param(name, shape)
                .map(|p| p.tensor());
        }
        let full = self.full_name(name);
        self.load(&full, Some(shape), Some(dtype), true)?
            .ok_or_else(|| self.not_found(&full))
    }

    /// The tensor `name` whatever its shape (buffers whose shape the caller reads from the file).
    pub fn get_any_shape(&self, name: &str) -> Result<Tensor> {
        let full = self.full_name(name);
        self.load(&full, None, self.dtype, false)?
            .ok_or_else(|| self.not_found(&full))
    }

    /// The tensor `name` exactly as stored (dtype and shape of the file, no conversion), for
    /// encoded data such as quantized weights.
    pub fn get_stored(&self, name: &str) -> Result<Tensor> {
        let full = self.full_name(name);
        self.load(&full, None, None, false)?
            .ok_or_else(|| self.not_found(&full))
    }

    /// The parameter `name` as a layer holds it: frozen tensor, or in a trainable store the
    /// [`Var`] (created from the checkpoint on first use). Missing names are errors.
    pub fn param(&self, name: &str, shape: &[usize]) -> Result<Param> {
        self.param_impl(name, shape, None)
    }

    /// Like [`VarStore::param`], but in a trainable store a name the checkpoint lacks is created
    /// from `init` instead of being an error. Frozen stores still require the name.
    pub fn param_or_init(&self, name: &str, shape: &[usize], init: Init) -> Result<Param> {
        self.param_impl(name, shape, Some(init))
    }

    fn param_impl(&self, name: &str, shape: &[usize], init: Option<Init>) -> Result<Param> {
        let full = self.full_name(name);
        let Some(seed) = self.inner.trainable else {
            return self
                .load(&full, Some(shape), self.dtype, false)?
                .map(Param::Frozen)
                .ok_or_else(|| self.not_found(&full));
        };
        if let Some(var) = self.existing_var(&full, shape)? {
            return Ok(Param::Trainable(var));
        }
        let dtype = self.dtype.unwrap_or(DType::F32);
        let value = match self.load(&full, Some(shape), Some(dtype), false)? {
            Some(t) => t,
            None => match init {
                Some(init) => init.tensor(shape, dtype, name_seed(seed, &full))?,
                None => return Err(self.not_found(&full)),
            },
        };
        let var = Var::from_tensor(&value).map_err(|e| Error::SafeTensors {
            path: self.inner.sources.desc(),
            tensor: Some(full.clone()),
            msg: format!("cannot be trained: {e}"),
        })?;
        let mut st = lock(&self.inner.state);
        // Another handle may have created it meanwhile; the first one wins so ties stay tied.
        if let Some(&i) = st.var_index.get(&full) {
            return Ok(Param::Trainable(st.vars[i].1.clone()));
        }
        let i = st.vars.len();
        st.vars.push((full.clone(), var.clone()));
        st.var_index.insert(full, i);
        Ok(Param::Trainable(var))
    }

    fn existing_var(&self, full: &str, shape: &[usize]) -> Result<Option<Var>> {
        let st = lock(&self.inner.state);
        let Some(&i) = st.var_index.get(full) else {
            return Ok(None);
        };
        let var = st.vars[i].1.clone();
        if var.shape() != shape {
            return Err(Error::ParameterShape {
                name: full.to_string(),
                expected: shape.to_vec(),
                actual: var.shape(),
                path: "<trainable VarStore: the var was created before with another shape>"
                    .to_string(),
            });
        }
        Ok(Some(var))
    }

    /// Every trainable var by full name, in creation order.
    pub fn all_vars(&self) -> Vec<(String, Var)> {
        lock(&self.inner.state).vars.clone()
    }

    /// Writes the current value of every var to a safetensors file.
    pub fn save_vars(&self, path: impl AsRef<Path>) -> Result<()> {
        let vars = self.all_vars();
        let tensors: Vec<(String, Tensor)> = vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
            .collect();
        crate::safetensors::save(path, tensors.iter().map(|(n, t)| (n.as_str(), t)))
    }

    /// Names requested so far that the checkpoint lacks, sorted.
    pub fn missing(&self) -> Vec<String> {
        lock(&self.inner.state).missing.iter().cloned().collect()
    }

    /// Names the checkpoint holds that nothing has loaded so far, sorted.
    pub fn unused(&self) -> Vec<String> {
        let st = lock(&self.inner.state);
        let mut v: Vec<String> = self
            .inner
            .sources
            .index
            .keys()
            .filter(|n| !st.used.contains(*n))
            .cloned()
            .collect();
        v.sort();
        v
    }

    /// Marks a checkpoint name (under this prefix) as used without loading it, e.g. a buffer
    /// the model recomputes.
    pub fn mark_used(&self, name: &str) {
        lock(&self.inner.state).used.insert(self.full_name(name));
    }

    /// Errors with [`Error::MissingOrUnexpected`] naming every checkpoint tensor that was never
    /// loaded.
    pub fn check_unused(&self) -> Result<()> {
        self.report(Vec::new(), self.unused())
    }

    /// Errors with [`Error::MissingOrUnexpected`] naming every parameter that was requested but
    /// missing and every checkpoint tensor that was never loaded.
    pub fn finish(&self) -> Result<()> {
        self.report(self.missing(), self.unused())
    }

    /// Like [`VarStore::finish`], ignoring unused names for which `ignore` is true (buffers such
    /// as `position_ids` that a model does not load).
    pub fn finish_ignoring(&self, ignore: impl Fn(&str) -> bool) -> Result<()> {
        let unused = self.unused().into_iter().filter(|n| !ignore(n)).collect();
        self.report(self.missing(), unused)
    }

    fn report(&self, missing: Vec<String>, unexpected: Vec<String>) -> Result<()> {
        if missing.is_empty() && unexpected.is_empty() {
            return Ok(());
        }
        Err(Error::MissingOrUnexpected {
            path: self.inner.sources.desc(),
            missing,
            unexpected,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kaiming_uniform_bound_matches_torch_linear() {
        let t = Init::KaimingUniform
            .tensor(&[50, 16], DType::F64, 3)
            .unwrap();
        let v = t.to_vec::<f64>().unwrap();
        let bound = 0.25;
        assert!(v.iter().all(|x| x.abs() <= bound));
        assert!(
            v.iter().any(|x| x.abs() > 0.8 * bound),
            "samples should fill the range"
        );
    }

    #[test]
    fn name_seed_differs_by_name() {
        assert_ne!(name_seed(0, "a.weight"), name_seed(0, "b.weight"));
        assert_ne!(name_seed(0, "a"), name_seed(1, "a"));
    }
}
