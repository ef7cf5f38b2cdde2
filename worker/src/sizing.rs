//! What the worker picks when it is not told: the weights' dtype, how many sequences the running batch holds
//! and the KV-cache positions it may allocate, from the devices that hold the model.
//!
//! The defaults used to be a CPU's: float32 and 32 sequences everywhere. On a GPU that wastes most of the
//! card: float32 halves the speed of every weight read, and an H200 holds some 1,000 sequences of 256
//! positions of GPT-J-6B's KV cache beside its float16 weights. This module is the policy alone, numbers in
//! and numbers out, so each rule is tested without a device; the engine asks the devices (free memory,
//! compute capability: `device_map`) and passes the answers in.

use crate::config::Dtype;

/// The batch size a CPU worker runs with when not told, and the least any default gives: what the worker has
/// always run with.
pub const CPU_BATCH_SIZE: usize = 32;

/// The positions a typical sequence holds (a prompt and its answer), for sizing a GPU's batch from its KV
/// budget: 128 in and 128 out, the shape the GPU benchmarks run.
pub const TYPICAL_SEQUENCE: usize = 256;

/// The most sequences a default batch holds: past this a step's host work grows with the rows while the
/// forward pass is already compute-bound, and one worker's share of a queue is enough.
pub const MAX_DEFAULT_BATCH_SIZE: usize = 1024;

/// The contexts of KV cache a device whose free memory cannot be told is budgeted.
pub const UNKNOWN_MEMORY_CONTEXTS: usize = 16;

/// A GPU's compute capability, `major.minor` (8.0 is Ampere, 9.0 Hopper).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Capability {
    pub major: u32,
    pub minor: u32,
}

impl Capability {
    /// Parses nvidia-smi's `compute_cap`, e.g. `9.0`.
    pub fn parse(s: &str) -> Option<Self> {
        let (major, minor) = s.trim().split_once('.')?;
        Some(Self {
            major: major.parse().ok()?,
            minor: minor.parse().ok()?,
        })
    }

    /// Whether the GPU computes in bfloat16 natively (Ampere and newer; libtorch's `is_bf16_supported`).
    pub fn has_bfloat16(self) -> bool {
        self.major >= 8
    }
}

/// The dtype when none is given, from the GPUs the model is placed on (their capability, `None` where it
/// cannot be told): float32 on the CPU alone; on GPUs bfloat16 when every one of them computes in it (the
/// range of float32, so no overflow in long sums), else float16.
pub fn default_dtype(gpus: &[Option<Capability>]) -> Dtype {
    if gpus.is_empty() {
        Dtype::Float32
    } else if gpus.iter().all(|c| c.is_some_and(Capability::has_bfloat16)) {
        Dtype::BFloat16
    } else {
        Dtype::Float16
    }
}

/// A device that holds layers, as the batch budget sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerDevice {
    pub gpu: bool,
    /// Bytes free on it now, with the weights loaded; `None` when it cannot be told.
    pub free_bytes: Option<u64>,
    /// Layers it holds, whose keys and values it keeps.
    pub layers: usize,
}

/// What the batch limits are computed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Memory {
    pub devices: Vec<LayerDevice>,
    /// Bytes of one position's keys and values in one layer (2 × n_embd × the dtype's size).
    pub kv_bytes_per_layer_position: u64,
    /// The model's context.
    pub n_positions: usize,
}

impl Memory {
    /// KV positions that fit beside the weights on every device: 90 % of a GPU's free memory (the rest is
    /// for activations and the allocator's slack), half the host's available memory (which other processes
    /// share), and [`UNKNOWN_MEMORY_CONTEXTS`] contexts where the memory is unknown.
    pub fn kv_positions(&self) -> usize {
        self.devices
            .iter()
            .map(|d| match d.free_bytes {
                Some(free) => {
                    let usable = if d.gpu { free / 10 * 9 } else { free / 2 };
                    let per_position = self.kv_bytes_per_layer_position * d.layers.max(1) as u64;
                    usize::try_from(usable / per_position.max(1)).unwrap_or(usize::MAX)
                }
                None => UNKNOWN_MEMORY_CONTEXTS.saturating_mul(self.n_positions),
            })
            .min()
            .unwrap_or(UNKNOWN_MEMORY_CONTEXTS.saturating_mul(self.n_positions))
    }

    fn on_gpu(&self) -> bool {
        self.devices.iter().any(|d| d.gpu)
    }
}

/// The running batch's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    pub max_batch_size: usize,
    pub max_batch_tokens: usize,
    /// Whether layers run on a GPU, where a step of a few more rows costs about what one row costs (the
    /// default of `--pause-batch-lane` follows it).
    pub on_gpu: bool,
}

/// The batch's bounds: those given, and for those not given what the memory affords.
///
/// - The KV budget is what fits beside the weights ([`Memory::kv_positions`]), capped at full contexts for
///   every sequence of the batch (more could never be used), and at least one full context.
/// - The batch size: on the CPU alone [`CPU_BATCH_SIZE`]; with layers on a GPU, that budget divided by a
///   [`TYPICAL_SEQUENCE`], between [`CPU_BATCH_SIZE`] and [`MAX_DEFAULT_BATCH_SIZE`]. A batch of more
///   sequences than the budget holds at once is fine: the budget admits them as they fit.
pub fn batch_limits(
    memory: &Memory,
    max_batch_size: Option<usize>,
    max_batch_tokens: Option<usize>,
) -> BatchLimits {
    let fits = memory.kv_positions();
    let max_batch_size = match max_batch_size {
        Some(n) => n.max(1),
        None if memory.on_gpu() => (fits / TYPICAL_SEQUENCE).clamp(CPU_BATCH_SIZE, MAX_DEFAULT_BATCH_SIZE),
        None => CPU_BATCH_SIZE,
    };
    let max_batch_tokens = max_batch_tokens.unwrap_or_else(|| {
        let cap = max_batch_size.saturating_mul(memory.n_positions);
        fits.min(cap).max(memory.n_positions.min(cap))
    });
    BatchLimits {
        max_batch_size,
        max_batch_tokens,
        on_gpu: memory.on_gpu(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    /// GPT-J-6B's KV cache in float16: 2 × 4096 × 2 bytes a position and layer, 28 layers, 2048 positions.
    fn gptj_6b(devices: Vec<LayerDevice>) -> Memory {
        Memory {
            devices,
            kv_bytes_per_layer_position: 2 * 4096 * 2,
            n_positions: 2048,
        }
    }

    fn gpu(free_gib: u64) -> LayerDevice {
        LayerDevice {
            gpu: true,
            free_bytes: Some(free_gib * GIB),
            layers: 28,
        }
    }

    fn cpu(free_gib: u64, layers: usize) -> LayerDevice {
        LayerDevice {
            gpu: false,
            free_bytes: Some(free_gib * GIB),
            layers,
        }
    }

    #[test]
    fn without_a_dtype_the_cpu_runs_float32_and_a_gpu_half_precision() {
        let hopper = Capability::parse("9.0");
        let turing = Capability::parse("7.5");
        assert_eq!(hopper, Some(Capability { major: 9, minor: 0 }));
        assert_eq!(default_dtype(&[]), Dtype::Float32);
        assert_eq!(default_dtype(&[hopper]), Dtype::BFloat16);
        assert_eq!(default_dtype(&[turing]), Dtype::Float16);
        // Every GPU must compute in bfloat16, and one whose capability is unknown may not.
        assert_eq!(default_dtype(&[hopper, turing]), Dtype::Float16);
        assert_eq!(default_dtype(&[None]), Dtype::Float16);
        assert_eq!(Capability::parse("n/a"), None);
    }

    #[test]
    fn the_cpu_keeps_its_batch_of_32_and_a_budget_of_what_half_the_host_memory_holds() {
        // 2 GiB free: 1 GiB usable, 458,752 bytes a position over 28 layers.
        let limits = batch_limits(&gptj_6b(vec![cpu(2, 28)]), None, None);
        assert_eq!(limits.max_batch_size, 32);
        assert_eq!(limits.max_batch_tokens, (GIB / 458_752) as usize);
        // Plenty of memory: no more than 32 full contexts.
        let limits = batch_limits(&gptj_6b(vec![cpu(1024, 28)]), None, None);
        assert_eq!(limits.max_batch_tokens, 32 * 2048);
    }

    #[test]
    fn a_gpu_batch_holds_what_its_free_memory_affords_at_256_positions_a_sequence() {
        // An 80 GB H100 after 12 GiB of weights: ~66 GiB free, 90 % of it for ~139,000 positions.
        let h100 = batch_limits(&gptj_6b(vec![gpu(66)]), None, None);
        let positions = (66 * GIB / 10 * 9 / 458_752) as usize;
        assert_eq!(h100.max_batch_tokens, positions);
        assert_eq!(h100.max_batch_size, positions / 256);
        assert!((500..600).contains(&h100.max_batch_size), "{h100:?}");
        // An H200 (~127 GiB free) would hold ~1,045 such sequences: capped at 1024. A small card never
        // gets fewer than the CPU's 32.
        assert_eq!(
            batch_limits(&gptj_6b(vec![gpu(127)]), None, None).max_batch_size,
            1024
        );
        assert_eq!(
            batch_limits(&gptj_6b(vec![gpu(2)]), None, None).max_batch_size,
            32
        );
    }

    #[test]
    fn given_values_stand_and_the_other_follows_from_them() {
        let memory = gptj_6b(vec![gpu(127)]);
        let limits = batch_limits(&memory, Some(8), None);
        assert_eq!(
            limits,
            BatchLimits {
                max_batch_size: 8,
                max_batch_tokens: 8 * 2048,
                on_gpu: true,
            }
        );
        let limits = batch_limits(&memory, None, Some(10_000));
        assert_eq!(limits.max_batch_tokens, 10_000);
        assert!(
            limits.max_batch_size > 32,
            "the batch size still comes from the memory"
        );
        assert_eq!(batch_limits(&memory, Some(0), Some(1)).max_batch_size, 1);
    }

    #[test]
    fn a_split_model_is_bounded_by_its_tightest_device_and_unknown_memory_by_16_contexts() {
        // Half the layers on a GPU with 1 GiB left, half on a roomy host: the GPU bounds the budget.
        let split = gptj_6b(vec![LayerDevice { layers: 14, ..gpu(1) }, cpu(512, 14)]);
        assert_eq!(split.kv_positions(), (GIB / 10 * 9 / (16_384 * 14)) as usize);
        let unknown = gptj_6b(vec![LayerDevice {
            free_bytes: None,
            ..gpu(0)
        }]);
        assert_eq!(unknown.kv_positions(), 16 * 2048);
        assert_eq!(batch_limits(&unknown, None, None).max_batch_size, 128);
    }
}
