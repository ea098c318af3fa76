//! Reverse-mode automatic differentiation.
//!
//! Every op that produces a tensor from tracked inputs (while gradients are enabled) attaches a
//! [`Backward`] node that holds its inputs and knows how to turn the gradient of its output into
//! gradients of its inputs. Leaves are [`Var`]s. [`Tensor::backward`] walks the graph in reverse
//! topological order, returns every gradient in a [`Gradients`] map and adds the gradients of
//! leaves into their `Var`'s accumulated `.grad()` (like PyTorch, until [`Var::zero_grad`]).
//!
//! Backward functions run with gradient recording off: second-order gradients are not built.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use crate::tensor::TensorId;
use crate::{DType, Device, Error, Result, Tensor};

/// The derivative of one op: given the op's output and the gradient flowing into it, returns one
/// gradient per input (same order as [`Backward::inputs`]); `None` for inputs that get none.
///
/// Gradients must have exactly the shape of their input (reduce broadcast dims yourself).
/// Public so that crates building fused ops (mgm-kernels based layers) can plug into autograd.
pub trait Backward: Send + Sync {
    /// The op name, for error messages.
    fn name(&self) -> &'static str;
    /// The tensors this op read.
    fn inputs(&self) -> Vec<&Tensor>;
    /// Gradients of the inputs.
    fn backward(&self, output: &Tensor, grad_output: &Tensor) -> Result<Vec<Option<Tensor>>>;
}

type GradSlot = Arc<Mutex<Option<Tensor>>>;

/// How a tensor takes part in autograd.
#[derive(Clone)]
pub(crate) enum Node {
    /// A leaf created from a [`Var`]; gradients accumulate into the slot.
    Leaf(GradSlot),
    /// The result of an op.
    Op(Arc<dyn Backward>),
}

thread_local! {
    static GRAD_ENABLED: Cell<bool> = const { Cell::new(true) };
}

/// True unless inside a [`no_grad`] scope on this thread.
pub fn is_grad_enabled() -> bool {
    GRAD_ENABLED.with(|g| g.get())
}

/// Runs `f` without recording autograd nodes (like `torch.no_grad()`).
pub fn no_grad<R>(f: impl FnOnce() -> R) -> R {
    let _guard = NoGradGuard::new();
    f()
}

/// Runs `f` on a worker of the rayon pool (see [`mgm_kernels::parallel::on_pool`]) with the
/// caller's recording state.
///
/// The state is per thread, and a worker may be inside another computation's [`no_grad`] scope
/// when it picks the job up (a worker waiting in a parallel loop runs queued jobs): without
/// this, a forward pass started with recording on could build no graph, and one started under
/// `no_grad` could build one. Tensor-level work moved onto the pool goes through here.
///
/// ```
/// use mgm_tensor::{is_grad_enabled, no_grad, on_pool};
/// assert!(on_pool(is_grad_enabled));
/// assert!(!no_grad(|| on_pool(is_grad_enabled)));
/// ```
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let enabled = is_grad_enabled();
    mgm_kernels::parallel::on_pool(move || {
        let _mode = GradModeGuard::set(enabled);
        f()
    })
}

/// Disables gradient recording on this thread until dropped.
pub struct NoGradGuard {
    _mode: GradModeGuard,
}

impl NoGradGuard {
    /// Turns recording off; the previous state is restored on drop.
    pub fn new() -> Self {
        NoGradGuard {
            _mode: GradModeGuard::set(false),
        }
    }
}

impl Default for NoGradGuard {
    fn default() -> Self {
        Self::new()
    }
}

/// True when recording is on and some input is tracked: the op must attach a node.
pub fn needs_grad(inputs: &[&Tensor]) -> bool {
    is_grad_enabled() && inputs.iter().any(|t| t.is_tracked())
}

/// Attaches the node built by `make` to `output` when any of the node's inputs is tracked.
pub fn attach<B: Backward + 'static>(output: Tensor, make: impl FnOnce() -> B) -> Tensor {
    if !is_grad_enabled() {
        return output;
    }
    let op = make();
    if op.inputs().iter().any(|t| t.is_tracked()) {
        output.with_node(Some(Node::Op(Arc::new(op))))
    } else {
        output
    }
}

impl Tensor {
    /// True when gradients flow to this tensor (a `Var` or the result of ops on one).
    pub fn is_tracked(&self) -> bool {
        self.0.node.is_some()
    }

    /// The same data with no autograd history.
    pub fn detach(&self) -> Tensor {
        if self.is_tracked() {
            self.with_node(None)
        } else {
            self.clone()
        }
    }

    /// Attaches a custom backward node (for fused ops defined outside this crate). The node is
    /// only attached when gradients are enabled and one of its inputs is tracked.
    pub fn with_backward<B: Backward + 'static>(self, op: B) -> Tensor {
        attach(self.detach(), || op)
    }

    /// Backpropagates from a one-element tensor (a loss), like `loss.backward()`.
    pub fn backward(&self) -> Result<Gradients> {
        if self.numel() != 1 {
            return Err(Error::Backward(format!(
                "backward() needs a one-element loss, got shape {:?}; use backward_with(grad)",
                self.shape()
            )));
        }
        self.backward_with(&self.ones_like()?)
    }

    /// Backpropagates with an explicit output gradient of this tensor's shape.
    pub fn backward_with(&self, grad: &Tensor) -> Result<Gradients> {
        if grad.shape() != self.shape() {
            return Err(Error::shape_mismatch(
                "backward",
                self.shape(),
                grad.shape(),
                "gradient must match output",
            ));
        }
        if !self.is_tracked() {
            return Err(Error::Backward(
                "the tensor does not depend on any Var (nothing to differentiate; was it computed under no_grad?)"
                    .into(),
            ));
        }
        let _guard = NoGradGuard::new();
        let order = topo_order(self);
        let mut grads: HashMap<TensorId, Tensor> = HashMap::new();
        grads.insert(self.id(), grad.detach());
        let mut leaves: Vec<(Tensor, GradSlot)> = Vec::new();
        for node in order.iter().rev() {
            let Some(g) = grads.get(&node.id()).cloned() else {
                continue;
            };
            match node.0.node.as_ref() {
                Some(Node::Leaf(slot)) => leaves.push((node.clone(), slot.clone())),
                Some(Node::Op(op)) => {
                    let inputs = op.inputs();
                    let in_grads = op.backward(node, &g)?;
                    if in_grads.len() != inputs.len() {
                        return Err(Error::Backward(format!(
                            "{}: returned {} gradients for {} inputs",
                            op.name(),
                            in_grads.len(),
                            inputs.len()
                        )));
                    }
                    for (input, ig) in inputs.into_iter().zip(in_grads) {
                        let Some(ig) = ig else { continue };
                        if !input.is_tracked() {
                            continue;
                        }
                        if ig.shape() != input.shape() {
                            return Err(Error::Backward(format!(
                                "{}: gradient shape {:?} != input shape {:?}",
                                op.name(),
                                ig.shape(),
                                input.shape()
                            )));
                        }
                        let ig = if ig.dtype() != input.dtype() {
                            ig.to_dtype(input.dtype())?
                        } else {
                            ig
                        };
                        let entry = match grads.remove(&input.id()) {
                            Some(prev) => prev.add(&ig)?,
                            None => ig,
                        };
                        grads.insert(input.id(), entry);
                    }
                }
                None => {}
            }
        }
        for (leaf, slot) in leaves {
            let g = grads
                .get(&leaf.id())
                .cloned()
                .expect("leaf was visited because it has a gradient");
            let mut s = slot
                .lock()
                .map_err(|_| Error::Backward("a Var's gradient lock was poisoned".into()))?;
            *s = Some(match s.take() {
                Some(prev) => prev.add(&g)?,
                None => g.contiguous()?,
            });
        }
        Ok(Gradients { grads })
    }
}

/// Tensors reachable from `root` through op nodes, inputs before the ops that read them.
fn topo_order(root: &Tensor) -> Vec<Tensor> {
    // Iterative DFS: model graphs are deep enough to overflow a recursive walk.
    let mut order = Vec::new();
    let mut seen: HashSet<TensorId> = HashSet::new();
    let mut stack: Vec<(Tensor, bool)> = vec![(root.clone(), false)];
    while let Some((t, expanded)) = stack.pop() {
        if expanded {
            order.push(t);
            continue;
        }
        if !seen.insert(t.id()) {
            continue;
        }
        stack.push((t.clone(), true));
        if let Some(Node::Op(op)) = t.0.node.as_ref() {
            for input in op.inputs() {
                if input.is_tracked() && !seen.contains(&input.id()) {
                    stack.push((input.clone(), false));
                }
            }
        }
    }
    order
}

/// The gradients computed by one backward pass, by tensor.
#[derive(Debug)]
pub struct Gradients {
    grads: HashMap<TensorId, Tensor>,
}

impl Gradients {
    /// The gradient of `t` (a tracked tensor that the loss depends on).
    pub fn get(&self, t: &Tensor) -> Option<&Tensor> {
        self.grads.get(&t.id())
    }

    /// The gradient of a `Var` from this pass only.
    pub fn get_var(&self, v: &Var) -> Option<&Tensor> {
        self.grads.get(&v.as_tensor().id())
    }

    /// Number of gradients held.
    pub fn len(&self) -> usize {
        self.grads.len()
    }

    /// True when no gradient was computed.
    pub fn is_empty(&self) -> bool {
        self.grads.is_empty()
    }
}

/// A trainable leaf tensor: its value can be replaced (by an optimizer) and its gradient
/// accumulates across backward passes until [`Var::zero_grad`].
///
/// ```
/// # use mgm_tensor::{Tensor, Var};
/// let w = Var::from_tensor(&Tensor::from_vec(vec![1f32, 2.0], &[2])?)?;
/// let loss = w.as_tensor().sqr()?.sum_all()?;
/// loss.backward()?;
/// assert_eq!(w.grad().unwrap().to_vec::<f32>()?, vec![2.0, 4.0]);
/// # Ok::<(), mgm_tensor::Error>(())
/// ```
#[derive(Clone)]
pub struct Var(Arc<VarInner>);

struct VarInner {
    value: RwLock<Tensor>,
    grad: GradSlot,
}

impl Var {
    /// A Var holding a contiguous copy of `t` (detached from any graph). Only float dtypes can
    /// be differentiated.
    pub fn from_tensor(t: &Tensor) -> Result<Var> {
        t.ensure_float("Var::from_tensor")?;
        let grad: GradSlot = Arc::new(Mutex::new(None));
        let value = t
            .detach()
            .copy_untracked()?
            .with_node(Some(Node::Leaf(grad.clone())));
        Ok(Var(Arc::new(VarInner {
            value: RwLock::new(value),
            grad,
        })))
    }

    /// A Var of zeros.
    pub fn zeros(shape: &[usize], dtype: DType, device: Device) -> Result<Var> {
        Var::from_tensor(&Tensor::zeros(shape, dtype, device)?)
    }

    /// The current value as a tracked tensor (ops on it record gradients).
    pub fn as_tensor(&self) -> Tensor {
        self.0
            .value
            .read()
            .expect("Var value lock is never held across a panic")
            .clone()
    }

    /// Replaces the value (same shape and dtype), keeping the accumulated gradient.
    pub fn set(&self, t: &Tensor) -> Result<()> {
        let mut v = self
            .0
            .value
            .write()
            .expect("Var value lock is never held across a panic");
        if t.shape() != v.shape() {
            return Err(Error::shape_mismatch(
                "Var::set",
                v.shape(),
                t.shape(),
                "new value must keep the shape",
            ));
        }
        if t.dtype() != v.dtype() {
            return Err(Error::DTypeMismatch {
                op: "Var::set",
                lhs: v.dtype(),
                rhs: t.dtype(),
            });
        }
        // Keep the id so that Gradients::get_var and graphs built before still refer to this Var.
        let fresh = t.detach().contiguous()?;
        *v = Tensor(Arc::new(crate::tensor::TensorInner {
            id: v.id(),
            storage: fresh.0.storage.clone(),
            layout: fresh.0.layout.clone(),
            dtype: fresh.0.dtype,
            device: fresh.0.device,
            node: Some(Node::Leaf(self.0.grad.clone())),
        }));
        Ok(())
    }

    /// The gradient accumulated since the last [`Var::zero_grad`], if any.
    pub fn grad(&self) -> Option<Tensor> {
        self.0
            .grad
            .lock()
            .expect("grad lock is never held across a panic")
            .clone()
    }

    /// Clears the accumulated gradient.
    pub fn zero_grad(&self) {
        *self
            .0
            .grad
            .lock()
            .expect("grad lock is never held across a panic") = None;
    }

    /// Shape of the value.
    pub fn shape(&self) -> Vec<usize> {
        self.as_tensor().shape().to_vec()
    }
}

impl std::fmt::Debug for Var {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Var({:?})", self.as_tensor())
    }
}

/// Sets this thread's recording state until dropped, then restores the previous one.
struct GradModeGuard {
    prev: bool,
}

impl GradModeGuard {
    fn set(enabled: bool) -> Self {
        GradModeGuard {
            prev: GRAD_ENABLED.with(|g| g.replace(enabled)),
        }
    }
}

impl Drop for GradModeGuard {
    fn drop(&mut self) {
        GRAD_ENABLED.with(|g| g.set(self.prev));
    }
}

type Recompute = dyn Fn(&[Tensor]) -> Result<Tensor> + Send + Sync;

/// The node of [`checkpoint`]: holds the inputs, not the activations inside.
struct CheckpointBackward {
    inputs: Vec<Tensor>,
    /// The leading `n_activations` inputs are activations; the rest are parameters.
    n_activations: usize,
    f: Arc<Recompute>,
}

impl Backward for CheckpointBackward {
    fn name(&self) -> &'static str {
        "checkpoint"
    }
    fn inputs(&self) -> Vec<&Tensor> {
        self.inputs.iter().collect()
    }
    fn backward(&self, _output: &Tensor, grad_output: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let _on = GradModeGuard::set(true);
        // fresh leaves for the activations, so that their gradients can be read back; the
        // parameters inside `f` are Vars and receive theirs directly from the inner pass
        let leaves = self.inputs[..self.n_activations]
            .iter()
            .map(|t| {
                if t.is_tracked() && t.dtype().is_float() {
                    Var::from_tensor(t).map(Some)
                } else {
                    Ok(None)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let args: Vec<Tensor> = leaves
            .iter()
            .zip(&self.inputs)
            .map(|(l, t)| l.as_ref().map_or_else(|| t.detach(), Var::as_tensor))
            .collect();
        let out = (self.f)(&args)?;
        if out.is_tracked() {
            out.backward_with(grad_output)?;
        }
        let mut grads: Vec<Option<Tensor>> = leaves
            .iter()
            .map(|l| l.as_ref().and_then(Var::grad))
            .collect();
        grads.resize(self.inputs.len(), None);
        Ok(grads)
    }
}

/// Activation checkpointing (`torch.utils.checkpoint`): runs `f(activations)` without keeping
/// its intermediate tensors and records one node that, in backward, runs `f` again with
/// recording on and backpropagates through it. `params` are the tensors of the `Var`s that `f`
/// reads (so that the node is recorded even when no activation is tracked); their gradients
/// accumulate in the `Var`s during the recomputation. `f` must compute the same thing both
/// times (no randomness).
///
/// ```
/// # use mgm_tensor::{Tensor, Var, checkpoint};
/// let w = Var::from_tensor(&Tensor::from_vec(vec![2f32], &[1])?)?;
/// let x = Tensor::from_vec(vec![3f32], &[1])?;
/// let wc = w.clone();
/// let y = checkpoint(&[x], &[w.as_tensor()], move |a| a[0].mul(&wc.as_tensor())?.sqr())?;
/// y.sum_all()?.backward()?; // d(w x)^2 / dw = 2 w x^2 = 36
/// assert_eq!(w.grad().unwrap().to_vec::<f32>()?, vec![36.0]);
/// # Ok::<(), mgm_tensor::Error>(())
/// ```
pub fn checkpoint(
    activations: &[Tensor],
    params: &[Tensor],
    f: impl Fn(&[Tensor]) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    let inputs: Vec<Tensor> = activations.iter().chain(params).cloned().collect();
    if !needs_grad(&inputs.iter().collect::<Vec<_>>()) {
        return f(activations);
    }
    let detached: Vec<Tensor> = activations.iter().map(Tensor::detach).collect();
    let out = no_grad(|| f(&detached))?;
    let f: Arc<Recompute> = Arc::new(f);
    Ok(attach(out, || CheckpointBackward {
        inputs,
        n_activations: activations.len(),
        f,
    }))
}
