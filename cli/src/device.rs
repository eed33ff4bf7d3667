//! Run-time choice of the burn backend: `--device cpu` (ndarray, always built) or
//! `--device cuda[:N]` (burn's CUDA backend, built with `--features cuda`).

use std::str::FromStr;

use ft_model::QuantBackend;

/// A device named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The ndarray CPU backend.
    Cpu,
    /// CUDA device N.
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("expected cpu, cuda or cuda:N, got {s:?}")),
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Work that runs on any backend.
pub trait Job {
    /// What the job returns.
    type Output;
    /// Runs on backend `B`.
    fn run<B: QuantBackend>(self, device: B::Device) -> anyhow::Result<Self::Output>;
}

/// The CPU backend.
pub type Cpu = burn::backend::NdArray<f32>;

/// Runs `job` on the backend of `spec`.
pub fn dispatch<J: Job>(spec: DeviceSpec, job: J) -> anyhow::Result<J::Output> {
    match spec {
        DeviceSpec::Cpu => job.run::<Cpu>(burn::backend::ndarray::NdArrayDevice::Cpu),
        DeviceSpec::Cuda(n) => run_cuda(n, job),
    }
}

#[cfg(feature = "cuda")]
fn run_cuda<J: Job>(n: usize, job: J) -> anyhow::Result<J::Output> {
    use burn::backend::cuda::CudaDevice;
    job.run::<burn::backend::Cuda>(CudaDevice::new(n))
}

#[cfg(not(feature = "cuda"))]
fn run_cuda<J: Job>(_n: usize, _job: J) -> anyhow::Result<J::Output> {
    anyhow::bail!(
        "--device cuda: this ft was built without CUDA; rebuild with `cargo build --features cuda`"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_names() {
        assert_eq!("cpu".parse(), Ok(DeviceSpec::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceSpec::Cuda(3)));
        assert!("gpu".parse::<DeviceSpec>().is_err());
    }
}
