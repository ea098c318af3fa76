//! mgm-ptx: parser, validator and CPU executor for the PTX subset mgm-rs kernels are written in,
//! so that hand-written kernels can be run and property-tested on machines without a GPU.
//!
//! [`Module::parse`] checks the source (unsupported instructions, undeclared registers, undefined
//! labels and type mismatches are errors naming the line); [`run`] executes one entry over a grid
//! with CUDA semantics (barriers, warp shuffles, shared memory) and reports out-of-bounds accesses,
//! shared-memory races, reads of uninitialised shared memory and barrier or shuffle divergence as
//! [`Error::Exec`] naming the kernel, line, block and thread.
//!
//! ```
//! use mgm_ptx::{Approx, Arg, Launch, Module};
//! let m = Module::parse(r#".version 8.0
//! .target sm_80
//! .address_size 64
//! .visible .entry twice(.param .u64 x, .param .u64 y) {
//!   .reg .b32 %r1; .reg .f32 %f1; .reg .b64 %rd<5>;
//!   ld.param.u64 %rd1, [x]; ld.param.u64 %rd2, [y]; mov.u32 %r1, %tid.x;
//!   mad.wide.u32 %rd3, %r1, 4, %rd1; mad.wide.u32 %rd4, %r1, 4, %rd2;
//!   ld.global.f32 %f1, [%rd3]; add.f32 %f1, %f1, %f1; st.global.f32 [%rd4], %f1; ret;
//! }"#)?;
//! let (x, mut y) = ([1.0f32, 2.0, 3.0, 4.0], [0.0f32; 4]);
//! let launch = Launch { grid: [1, 1, 1], block: [4, 1, 1], shared_bytes: 0, approx: Approx::Exact };
//! mgm_ptx::run(&m, "twice", &launch, &mut [Arg::input(&x), Arg::output(&mut y)])?;
//! assert_eq!(y, [2.0, 4.0, 6.0, 8.0]);
//! # Ok::<(), mgm_ptx::Error>(())
//! ```

mod approx;
mod ast;
mod exec;
mod lexer;
mod parser;

use std::fmt;

/// Errors of parsing and executing PTX.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Syntax error or unsupported construct at a source line.
    #[error("ptx line {line}: {msg}")]
    Parse {
        /// 1-based source line.
        line: usize,
        /// What is wrong, quoting the offending text.
        msg: String,
    },
    /// No `.entry` with that name in the module.
    #[error("no kernel `{0}` in module")]
    NoKernel(String),
    /// Arguments do not match the kernel's `.param` list.
    #[error("kernel {kernel}: {msg}")]
    Args {
        /// Entry name.
        kernel: String,
        /// What is wrong.
        msg: String,
    },
    /// A fault while running: names kernel, source line, thread and block.
    #[error("kernel {kernel}, line {line}, block {block:?}, thread {thread:?}: {fault}")]
    Exec {
        /// Entry name.
        kernel: String,
        /// 1-based source line of the faulting instruction.
        line: usize,
        /// %ctaid of the faulting thread.
        block: [u32; 3],
        /// %tid of the faulting thread.
        thread: [u32; 3],
        /// What happened.
        fault: Fault,
    },
}

/// What went wrong during execution.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// A global access not entirely inside one buffer argument.
    GlobalOutOfBounds {
        /// Fake global address of the access.
        addr: u64,
        /// Size of the access in bytes.
        bytes: u32,
        /// Which buffer it missed and by how much.
        detail: String,
    },
    /// A store or atomic into a buffer passed as [`Arg::In`].
    StoreToInput {
        /// Name of the `.param` holding the buffer.
        param: String,
        /// Byte offset into the buffer.
        offset: u64,
    },
    /// An access whose address is not a multiple of its size.
    Misaligned {
        /// `global` or `shared`.
        space: &'static str,
        /// Address of the access.
        addr: u64,
        /// Required alignment in bytes.
        align: u32,
    },
    /// A shared access outside the block's shared memory.
    SharedOutOfBounds {
        /// Shared address of the access.
        addr: u64,
        /// Size of the access in bytes.
        bytes: u32,
        /// Shared memory of the block (static + dynamic) in bytes.
        size: u32,
    },
    /// A read of a shared byte that no thread of the block has written in this launch.
    UninitializedShared {
        /// Shared address of the first unwritten byte.
        addr: u64,
    },
    /// Two threads touched one shared 4-byte word between barriers and one access was a
    /// non-atomic write; reported at the second access.
    SharedRace {
        /// Address of the word.
        addr: u64,
        /// This access: `read`, `write` or `atomic`.
        access: &'static str,
        /// %tid of the other thread.
        other_thread: [u32; 3],
        /// Source line of the other thread's access.
        other_line: usize,
        /// What the other thread did: `wrote` or `accessed`.
        other_access: &'static str,
    },
    /// Threads of a block wait at a barrier that cannot complete.
    BarrierDivergence {
        /// Where the other threads are.
        detail: String,
    },
    /// Lanes named in a `shfl.sync` membermask are not all at that shuffle.
    ShuffleDivergence {
        /// Which lane is elsewhere.
        detail: String,
    },
    /// More instructions than [`RunOptions::max_instructions`] (an infinite loop, most likely).
    BudgetExceeded {
        /// The limit that was hit.
        limit: u64,
    },
    /// Integer `div` or `rem` by zero (undefined in PTX).
    DivisionByZero,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::GlobalOutOfBounds {
                addr,
                bytes,
                detail,
            } => {
                write!(
                    f,
                    "out-of-bounds global access of {bytes} bytes at {addr:#x}: {detail}"
                )
            }
            Fault::StoreToInput { param, offset } => {
                write!(
                    f,
                    "store into read-only input buffer `{param}` at offset {offset}"
                )
            }
            Fault::Misaligned { space, addr, align } => {
                write!(
                    f,
                    "misaligned {space} access at {addr:#x} (needs {align}-byte alignment)"
                )
            }
            Fault::SharedOutOfBounds { addr, bytes, size } => write!(
                f,
                "out-of-bounds shared access of {bytes} bytes at {addr:#x} (block has {size} bytes of shared memory)"
            ),
            Fault::UninitializedShared { addr } => {
                write!(
                    f,
                    "read of uninitialised shared memory at {addr:#x} (never written in this block)"
                )
            }
            Fault::SharedRace {
                addr,
                access,
                other_thread,
                other_line,
                other_access,
            } => write!(
                f,
                "shared-memory race on word {addr:#x}: this {access} conflicts with thread {other_thread:?}, which \
                 {other_access} it at line {other_line} since the last barrier (missing bar.sync?)"
            ),
            Fault::BarrierDivergence { detail } => write!(f, "barrier divergence: {detail}"),
            Fault::ShuffleDivergence { detail } => write!(f, "shuffle divergence: {detail}"),
            Fault::BudgetExceeded { limit } => {
                write!(f, "instruction budget of {limit} exceeded (infinite loop?)")
            }
            Fault::DivisionByZero => write!(f, "integer division by zero"),
        }
    }
}

/// Result with the crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// A parsed PTX module (one file, several entries).
#[derive(Debug)]
pub struct Module {
    kernels: Vec<ast::Kernel>,
}

impl Module {
    /// Parses PTX source; unsupported instructions are errors naming the line.
    pub fn parse(src: &str) -> Result<Module> {
        Ok(Module {
            kernels: parser::parse_module(src)?,
        })
    }

    /// Names of the `.entry` kernels in source order.
    pub fn kernels(&self) -> Vec<&str> {
        self.kernels.iter().map(|k| k.name.as_str()).collect()
    }

    /// Number of decoded instructions of a kernel (including the implicit final `ret`).
    pub fn instruction_count(&self, kernel: &str) -> Option<usize> {
        self.kernels
            .iter()
            .find(|k| k.name == kernel)
            .map(|k| k.insts.len())
    }
}

/// How approximate instructions (`ex2.approx`, `rcp.approx`, `tanh.approx`, ...) are evaluated.
///
/// Bounds used (PTX ISA 9.1, section 9.7.3, "Floating Point Instructions"):
///
/// | instruction | documented bound |
/// |---|---|
/// | `ex2.approx.f32` | 2 ulp from the correctly rounded result, full range |
/// | `lg2.approx.f32` | absolute 2^-22 for inputs in (0.5, 2), relative 2^-22 elsewhere |
/// | `rcp.approx.f32` | 1 ulp, full range |
/// | `rsqrt.approx.f32` | relative 2^-22.9 |
/// | `sqrt.approx.f32` | relative 2^-23 |
/// | `tanh.approx.f32` | relative 2^-11 (subnormal inputs pass through) |
/// | `div.approx.f32` | 2 ulp for \|b\| in [2^-126, 2^126]; larger \|b\| gives 0 (NaN for infinite a) |
/// | `div.full.f32` | 2 ulp, full range |
///
/// Special inputs follow the ISA's tables in both modes (e.g. `ex2(-inf) = +0`, `lg2(0) = -inf`,
/// `rcp(±0) = ±inf`, `rsqrt(+inf) = +0`, `tanh(±inf) = ±1`); `.ftz` flushes subnormal inputs and
/// results to sign-preserving zero. `.rn` instructions are always exact IEEE f32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Approx {
    /// Correctly rounded result of the exact function (computed in f64).
    Exact,
    /// Exact result perturbed by the full documented error bound (sign varying per call), so a
    /// kernel that passes is robust to any conforming GPU.
    #[default]
    WorstCase,
}

/// One kernel launch: grid, block, dynamic shared memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    /// Blocks per grid (x, y, z).
    pub grid: [u32; 3],
    /// Threads per block (x, y, z).
    pub block: [u32; 3],
    /// Bytes of dynamic `.extern .shared` memory.
    pub shared_bytes: u32,
    /// Model of approximate instructions.
    pub approx: Approx,
}

/// A kernel argument, in `.param` order: device buffers are host slices.
pub enum Arg<'a> {
    /// Read-only global buffer (a store into it is a fault).
    In(&'a [u8]),
    /// Read-write global buffer.
    Out(&'a mut [u8]),
    /// `.param .u32` / `.b32`.
    U32(u32),
    /// `.param .s32`.
    I32(i32),
    /// `.param .u64` / `.b64` that is not a pointer.
    U64(u64),
    /// `.param .f32`.
    F32(f32),
}

impl<'a> Arg<'a> {
    /// Read-only buffer from any plain-old-data slice (f32, u16 bits of bf16, ...).
    pub fn input<T: bytemuck::Pod>(s: &'a [T]) -> Self {
        Arg::In(bytemuck::cast_slice(s))
    }
    /// Read-write buffer from any plain-old-data slice.
    pub fn output<T: bytemuck::Pod>(s: &'a mut [T]) -> Self {
        Arg::Out(bytemuck::cast_slice_mut(s))
    }
}

/// Counters of one run.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Instructions executed, summed over threads (guarded-off instructions count).
    pub instructions: u64,
    /// Barriers completed, summed over blocks.
    pub barriers: u64,
    /// Warp-wide `shfl.sync` exchanges.
    pub shuffles: u64,
    /// Atomic and reduction operations.
    pub atomics: u64,
    /// Blocks run.
    pub blocks: u64,
    /// Threads run.
    pub threads: u64,
    /// Shared memory per block (static + dynamic) in bytes.
    pub shared_bytes: u32,
    /// Bytes loaded from global memory.
    pub global_bytes_read: u64,
    /// Bytes stored to global memory (atomics not included).
    pub global_bytes_written: u64,
}

/// Limits of one run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunOptions {
    /// Instructions (summed over threads) after which the run fails with
    /// [`Fault::BudgetExceeded`]; guards against infinite loops.
    pub max_instructions: u64,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            max_instructions: 1 << 32,
        }
    }
}

/// Runs `kernel` of `module` over the grid with CUDA semantics.
pub fn run(module: &Module, kernel: &str, launch: &Launch, args: &mut [Arg<'_>]) -> Result<Stats> {
    run_with(module, kernel, launch, args, &RunOptions::default())
}

/// [`run`] with explicit limits.
pub fn run_with(
    module: &Module,
    kernel: &str,
    launch: &Launch,
    args: &mut [Arg<'_>],
    opts: &RunOptions,
) -> Result<Stats> {
    let k = module
        .kernels
        .iter()
        .find(|k| k.name == kernel)
        .ok_or_else(|| Error::NoKernel(kernel.to_string()))?;
    exec::run(k, launch, args, opts)
}
