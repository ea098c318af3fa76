//! Launch descriptions shared by the cudarc launchers and the mgm-ptx executor tests, so a kernel
//! runs with the same grid and the same `.param` order on a GPU and on the CPU executor.

/// Grid, block and dynamic shared memory of one kernel launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchDims {
    /// Blocks per grid (x, y, z).
    pub grid: [u32; 3],
    /// Threads per block (x, y, z).
    pub block: [u32; 3],
    /// Bytes of dynamic (`.extern .shared`) memory per block.
    pub shared_bytes: u32,
}

/// One kernel argument in `.param` order; buffers are host slices that a launcher copies to and
/// from the device (`In` is copied up only, `Out` up and back).
#[derive(Debug)]
pub enum KernelArg<'a> {
    /// Read-only buffer (`.param .u64` pointer).
    In(&'a [u8]),
    /// Read-write buffer (`.param .u64` pointer), copied back after the kernel.
    Out(&'a mut [u8]),
    /// `.param .u32`.
    U32(u32),
    /// `.param .s32`.
    I32(i32),
    /// `.param .f32`.
    F32(f32),
}

impl<'a> KernelArg<'a> {
    /// Read-only buffer from f32, u16 (bf16 bits) or any plain-old-data slice.
    pub fn input<T: bytemuck::Pod>(s: &'a [T]) -> Self {
        KernelArg::In(bytemuck::cast_slice(s))
    }
    /// Read-write buffer from any plain-old-data slice.
    pub fn output<T: bytemuck::Pod>(s: &'a mut [T]) -> Self {
        KernelArg::Out(bytemuck::cast_slice_mut(s))
    }
}

/// Everything needed to launch one PTX entry point: built by each family's `launch` function
/// (which checks the slice lengths) and consumed by `cuda::Gpu::run` or the mgm-ptx executor.
#[derive(Debug)]
pub struct KernelLaunch<'a> {
    /// Kernel family; its PTX is `ptx::source(family)`.
    pub family: &'static str,
    /// Entry point, e.g. `mgm_softmax_fwd_f32`.
    pub entry: &'static str,
    /// Grid and block.
    pub dims: LaunchDims,
    /// Arguments in `.param` order.
    pub args: Vec<KernelArg<'a>>,
}
