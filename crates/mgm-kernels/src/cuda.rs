//! The GPU path: runs a family's [`KernelLaunch`] on a CUDA device through cudarc.
//!
//! cudarc loads the driver library at run time and panics when it is missing, so [`Gpu::new`]
//! first probes for the library itself and returns [`Error::Cuda`] instead; a machine without a
//! driver gets one clear error line, never a panic.
//!
//! ```no_run
//! use mgm_kernels::{cuda::Gpu, softmax};
//! let gpu = Gpu::new(0)?; // Err("cuda: no CUDA driver library ...") on a machine without one
//! let x = [1.0f32, 2.0, 3.0];
//! let mut y = [0.0f32; 3];
//! softmax::cuda(&gpu, &x, &mut y, 1, 3)?;
//! # Ok::<(), mgm_kernels::Error>(())
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaModule, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;

use crate::launch::{KernelArg, KernelLaunch};
use crate::{Error, Result, ptx};

/// The file names cudarc tries for the driver library on this platform.
pub fn driver_candidates() -> Vec<String> {
    ["cuda", "nvcuda"]
        .iter()
        .flat_map(|l| cudarc::get_lib_name_candidates(l))
        .collect()
}

/// Returns the first of `candidates` that loads as a shared library, or an error listing them.
pub fn probe_driver(candidates: &[String]) -> Result<String> {
    for c in candidates {
        // SAFETY: loading the CUDA driver runs only its library initialisers, the same thing
        // cudarc does a moment later; the handle is dropped (dlclose) at once.
        if unsafe { libloading::Library::new(c) }.is_ok() {
            return Ok(c.clone());
        }
    }
    Err(Error::Cuda(format!(
        "no CUDA driver library found (tried {}); install the NVIDIA driver or use the CPU path",
        candidates.join(", ")
    )))
}

fn driver_err(what: &str) -> impl FnOnce(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::Cuda(format!("{what}: {e}"))
}

/// A CUDA device with its default stream and the PTX modules loaded so far.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("ordinal", &self.ctx.ordinal())
            .finish()
    }
}

enum DevArg {
    Buf(CudaSlice<u8>),
    U32(u32),
    I32(i32),
    F32(f32),
}

impl Gpu {
    /// Opens device `ordinal`; an error (not a panic) when there is no driver or no such device.
    pub fn new(ordinal: usize) -> Result<Gpu> {
        probe_driver(&driver_candidates())?;
        // A driver too old for a symbol cudarc binds makes cudarc panic: keep that inside.
        let ctx = std::panic::catch_unwind(|| CudaContext::new(ordinal))
            .map_err(|_| {
                Error::Cuda("the CUDA driver failed to initialise (cudarc panicked)".into())
            })?
            .map_err(driver_err("creating a context"))?;
        let stream = ctx.default_stream();
        Ok(Gpu {
            ctx,
            stream,
            modules: Mutex::new(HashMap::new()),
        })
    }

    /// The device's default stream (what device memory is allocated and copied on).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    fn module(&self, family: &'static str) -> Result<Arc<CudaModule>> {
        let mut modules = self
            .modules
            .lock()
            .expect("module cache lock is never poisoned");
        if let Some(m) = modules.get(family) {
            return Ok(m.clone());
        }
        let src = ptx::source(family)
            .ok_or_else(|| Error::Cuda(format!("no PTX for kernel family `{family}`")))?;
        let m = self
            .ctx
            .load_module(Ptx::from_src(src))
            .map_err(driver_err(family))?;
        modules.insert(family, m.clone());
        Ok(m)
    }

    /// Copies the launch's buffers to the device, runs the kernel, and copies `Out` buffers back.
    pub fn run(&self, launch: KernelLaunch<'_>) -> Result<()> {
        let d = launch.dims;
        if d.grid.contains(&0) || d.block.contains(&0) {
            return Ok(());
        }
        let func = self
            .module(launch.family)?
            .load_function(launch.entry)
            .map_err(driver_err(launch.entry))?;
        let up = |s: &[u8]| -> Result<CudaSlice<u8>> {
            if s.is_empty() {
                // A zero-byte allocation is an error in the driver; the kernel never reads it.
                self.stream.alloc_zeros::<u8>(4)
            } else {
                self.stream.clone_htod(s)
            }
            .map_err(driver_err("copying to the device"))
        };
        let mut dev = Vec::with_capacity(launch.args.len());
        for a in &launch.args {
            dev.push(match a {
                KernelArg::In(s) => DevArg::Buf(up(s)?),
                KernelArg::Out(s) => DevArg::Buf(up(s)?),
                KernelArg::U32(v) => DevArg::U32(*v),
                KernelArg::I32(v) => DevArg::I32(*v),
                KernelArg::F32(v) => DevArg::F32(*v),
            });
        }
        let mut builder = self.stream.launch_builder(&func);
        for a in &dev {
            match a {
                DevArg::Buf(b) => builder.arg(b),
                DevArg::U32(v) => builder.arg(v),
                DevArg::I32(v) => builder.arg(v),
                DevArg::F32(v) => builder.arg(v),
            };
        }
        let cfg = LaunchConfig {
            grid_dim: (d.grid[0], d.grid[1], d.grid[2]),
            block_dim: (d.block[0], d.block[1], d.block[2]),
            shared_mem_bytes: d.shared_bytes,
        };
        // SAFETY: the argument list follows the entry's `.param` list, which the family's
        // `launch` function builds (and the mgm-ptx executor checks in the property tests); every
        // buffer is a device allocation at least as large as its host slice.
        unsafe { builder.launch(cfg) }.map_err(driver_err(launch.entry))?;
        for (a, d) in launch.args.into_iter().zip(&dev) {
            if let (KernelArg::Out(host), DevArg::Buf(buf)) = (a, d) {
                if host.is_empty() {
                    continue;
                }
                let back = self
                    .stream
                    .clone_dtoh(buf)
                    .map_err(driver_err("copying from the device"))?;
                host.copy_from_slice(&back[..host.len()]);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_driver_is_an_error_naming_the_library() {
        let fake = vec!["libcuda_mgm_fake_missing.so.1".to_string()];
        let err = probe_driver(&fake).unwrap_err().to_string();
        assert!(
            err.contains("no CUDA driver library") && err.contains("libcuda_mgm_fake_missing.so.1"),
            "{err}"
        );
    }

    #[test]
    fn gpu_new_without_driver_is_an_error_not_a_panic() {
        // On a machine with a driver this opens the device; without one it must be a clean Err.
        match Gpu::new(0) {
            Ok(_) => {}
            Err(e) => assert!(e.to_string().starts_with("cuda: "), "{e}"),
        }
    }
}
