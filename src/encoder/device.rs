//! Where the encoder runs: `cpu`, `cuda`, `cuda:N`, or `auto` (the GPU when this build has
//! CUDA and a device answers, else the CPU). Asking for CUDA from a build without it, or on a
//! machine without a GPU, is an error that says so, never a silent fall-back.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;
use serde::{Deserialize, Deserializer};

use super::EncoderError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

/// Whether this binary was built with the `cuda` feature.
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

impl DeviceChoice {
    /// The configuration-time check: CUDA asked of a binary built without it.
    pub fn check(self) -> Result<(), EncoderError> {
        match self {
            DeviceChoice::Cuda(_) if !CUDA_BUILT => Err(EncoderError::Device(format!(
                "`{self}` asked of a synthrank built without CUDA: build with \
                 `cargo build --features cuda` (README: GPU), or use `device: cpu`"
            ))),
            _ => Ok(()),
        }
    }

    /// Opens the device; `auto` takes GPU 0 when there is one.
    pub fn open(self) -> Result<Device, EncoderError> {
        self.check()?;
        match self {
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Cuda(n) => Device::new_cuda(n).map_err(|e| {
                EncoderError::Device(format!("`{self}`: no CUDA device answers ({e})"))
            }),
            DeviceChoice::Auto if CUDA_BUILT => Ok(Device::new_cuda(0).unwrap_or(Device::Cpu)),
            DeviceChoice::Auto => Ok(Device::Cpu),
        }
    }
}

/// How a device is recorded in manifests and shown by `status`.
pub(crate) fn device_label(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Auto => f.write_str("auto"),
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceChoice::Cuda)
                .ok_or_else(|| format!("`{other}` is not a device: use auto, cpu, cuda or cuda:N")),
        }
    }
}

impl<'de> Deserialize<'de> for DeviceChoice {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_cuda_needs_a_cuda_build() {
        assert_eq!("cuda:1".parse(), Ok(DeviceChoice::Cuda(1)));
        assert_eq!("cuda".parse(), Ok(DeviceChoice::Cuda(0)));
        assert!("gpu".parse::<DeviceChoice>().is_err());
        assert!("cuda:x".parse::<DeviceChoice>().is_err());
        assert_eq!(device_label(&DeviceChoice::Cpu.open().unwrap()), "cpu");
        if !CUDA_BUILT {
            let error = DeviceChoice::Cuda(0).check().unwrap_err().to_string();
            assert!(error.contains("built without CUDA"), "{error}");
            assert_eq!(device_label(&DeviceChoice::Auto.open().unwrap()), "cpu");
        }
    }
}
