//! Where a tensor's data lives.

/// A compute device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Device {
    /// Host memory; every op is implemented here.
    #[default]
    Cpu,
    /// A CUDA GPU by ordinal. Tensors cannot be created on it until the CUDA backend lands:
    /// every attempt returns [`crate::Error::DeviceUnavailable`].
    Cuda(usize),
}

impl Device {
    /// True for [`Device::Cpu`].
    pub fn is_cpu(&self) -> bool {
        matches!(self, Device::Cpu)
    }

    /// Returns an error unless tensors can live on this device in this build.
    pub(crate) fn ensure_available(&self, op: &'static str) -> crate::Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(_) => Err(crate::Error::DeviceUnavailable {
                op,
                device: *self,
                msg: "mgm-tensor has no CUDA backend yet; use Device::Cpu".into(),
            }),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}
