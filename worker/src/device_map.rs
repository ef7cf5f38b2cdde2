//! Which device holds each part of the model: the embedding, every block, the final norm and the head.
//!
//! GPT-J-6B in float16 is 12 GB; a machine may have several smaller GPUs plus CPU memory. Like accelerate's
//! big-model inference, the model is cut at part boundaries and hidden states move between devices there.
//! A [`Placement`] is what the user asked for (one device, an explicit map, or memory budgets); it resolves
//! against a config into a [`DeviceMap`], the answer for every part. The planner is a pure function, so it
//! is tested on made-up budgets without the hardware. How much memory a device has free now
//! ([`free_bytes`]) and what a GPU computes in ([`compute_capability`]) are asked here too, for the
//! defaults the worker picks (`sizing`).

use crate::config::{Dtype, GptJConfig};
use crate::load_error::LoadError;
use crate::weights::Part;
use tch::Device;

/// The device of every part of a GPT-J model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceMap {
    pub embed: Device,
    pub layers: Vec<Device>,
    pub norm: Device,
    pub head: Device,
}

impl DeviceMap {
    /// Everything on one device.
    pub fn uniform(device: Device, n_layer: usize) -> Self {
        Self {
            embed: device,
            layers: vec![device; n_layer],
            norm: device,
            head: device,
        }
    }

    /// The device of `part` (a block this map does not place is a caller's bug: maps are checked against
    /// the config's `n_layer` before use).
    pub fn device(&self, part: Part) -> Device {
        match part {
            Part::Embed => self.embed,
            Part::Block(i) => self.layers[i],
            Part::Norm => self.norm,
            Part::Head => self.head,
        }
    }

    /// The distinct devices used, in the order the forward pass reaches them.
    pub fn devices(&self) -> Vec<Device> {
        let mut out: Vec<Device> = Vec::new();
        for d in Part::all(self.layers.len()).map(|p| self.device(p)) {
            if !out.contains(&d) {
                out.push(d);
            }
        }
        out
    }

    /// A one-line summary for logs: `embed=cpu h.0-13=cuda:0 h.14-27=cpu norm=cpu head=cpu`.
    pub fn describe(&self) -> String {
        let mut parts = vec![format!("embed={}", device_name(self.embed))];
        let mut start = 0;
        while start < self.layers.len() {
            let d = self.layers[start];
            let mut end = start;
            while end + 1 < self.layers.len() && self.layers[end + 1] == d {
                end += 1;
            }
            let first = Part::Block(start).short_path();
            let range = if end == start {
                first
            } else {
                format!("{first}-{end}")
            };
            parts.push(format!("{range}={}", device_name(d)));
            start = end + 1;
        }
        parts.push(format!("norm={}", device_name(self.norm)));
        parts.push(format!("head={}", device_name(self.head)));
        parts.join(" ")
    }

    /// Fails when the map names a CUDA device this machine does not have.
    pub fn check_available(&self) -> Result<(), LoadError> {
        let cuda_count = tch::Cuda::device_count().max(0) as usize;
        for d in self.devices() {
            if let Device::Cuda(i) = d
                && i >= cuda_count
            {
                return Err(LoadError::DeviceUnavailable(format!(
                    "{} ({cuda_count} CUDA device(s) visible)",
                    device_name(d)
                )));
            }
            if let Device::Mps | Device::Vulkan = d {
                return Err(LoadError::DeviceUnavailable(device_name(d)));
            }
        }
        Ok(())
    }
}

/// Bytes of memory free on `device` now: the host's `MemAvailable`, or a GPU's free memory as `nvidia-smi`
/// reports it (libtorch's C++ API has no query tch exposes). `None` when it cannot be told.
pub fn free_bytes(device: Device) -> Option<u64> {
    match device {
        Device::Cpu => {
            let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
            let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        }
        Device::Cuda(i) => {
            let out = std::process::Command::new("nvidia-smi")
                .args([
                    "--query-gpu=memory.free",
                    "--format=csv,noheader,nounits",
                    &format!("--id={i}"),
                ])
                .output()
                .ok()?;
            let mib: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
            Some(mib * 1024 * 1024)
        }
        _ => None,
    }
}

/// A GPU's compute capability as `nvidia-smi` reports it (tch 0.24 exposes no query of its own); `None` for
/// the CPU, or when it cannot be told (no `nvidia-smi`, or one too old for `compute_cap`).
pub fn compute_capability(device: Device) -> Option<crate::sizing::Capability> {
    let Device::Cuda(i) = device else {
        return None;
    };
    let out = std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=compute_cap",
            "--format=csv,noheader",
            &format!("--id={i}"),
        ])
        .output()
        .ok()?;
    crate::sizing::Capability::parse(&String::from_utf8_lossy(&out.stdout))
}

/// `cpu`, `cuda:0`, … (tch's `Debug` spells them `Cpu`, `Cuda(0)`).
pub fn device_name(d: Device) -> String {
    match d {
        Device::Cpu => "cpu".to_string(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// Parses `cpu`, `cuda` (= `cuda:0`), `cuda:N`, or a bare GPU index `N` (as accelerate's `max_memory` keys).
pub fn parse_device(s: &str) -> Result<Device, LoadError> {
    let t = s.trim().to_ascii_lowercase();
    let bad = || LoadError::Placement(format!("unknown device {s:?}: expected cpu, cuda or cuda:N"));
    match t.as_str() {
        "cpu" => Ok(Device::Cpu),
        "cuda" | "gpu" => Ok(Device::Cuda(0)),
        _ => {
            let idx = t
                .strip_prefix("cuda:")
                .or_else(|| t.strip_prefix("gpu:"))
                .unwrap_or(&t);
            idx.parse::<usize>().map(Device::Cuda).map_err(|_| bad())
        }
    }
}

/// Parses `10GiB`, `11GB`, `512MiB`, `1.5TB`, `1000000` (bytes). Decimal units are powers of 1000, binary
/// ones (`KiB`, `MiB`, `GiB`, `TiB`) powers of 1024, as in accelerate.
pub fn parse_bytes(s: &str) -> Result<u64, LoadError> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || {
        LoadError::Placement(format!(
            "bad memory size {s:?}: expected e.g. 10GiB, 11GB or 512MiB"
        ))
    };
    let value: f64 = num.parse().map_err(|_| bad())?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return Err(bad()),
    };
    let bytes = value * scale;
    if !bytes.is_finite() || bytes < 0.0 {
        return Err(bad());
    }
    Ok(bytes as u64)
}

/// A part named in an explicit device map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartSpec {
    Embed,
    /// Blocks `start..=end`.
    Layers(usize, usize),
    Norm,
    Head,
}

/// What the user asked for; [`Placement::resolve`] turns it into a [`DeviceMap`].
#[derive(Debug, Clone, PartialEq)]
pub enum Placement {
    /// The whole model on one device.
    Device(Device),
    /// Explicit assignments; parts not named stay on the CPU.
    Map(Vec<(Device, PartSpec)>),
    /// Memory budgets per device, filled in order (GPUs in the order given, then the CPU).
    MaxMemory(Vec<(Device, u64)>),
}

impl Default for Placement {
    fn default() -> Self {
        Placement::Device(Device::Cpu)
    }
}

impl Placement {
    /// Builds a placement from the command-line flags `--device-map`, `--max-memory` and `--device`, at most
    /// one of which may be given; none means everything on the CPU.
    ///
    /// - `device_map`: `cuda:0=0-13,cuda:1=14-27` — blocks (single indices or inclusive ranges) per device;
    ///   `embed`, `norm` and `head` may be named too (`cuda:0=embed,0-13,cuda:1=14-27,norm,head`; a token
    ///   without `=` belongs to the device before it, `+` also separates parts). Unnamed parts go on the CPU.
    /// - `max_memory`: `cuda:0=10GiB,cuda:1=10GiB,cpu=32GiB` — budgets planned like accelerate's
    ///   `infer_auto_device_map`, keeping room for the KV cache and activations (see [`plan`]).
    /// - `device`: `cpu`, `cuda`, `cuda:N`.
    pub fn from_args(
        device_map: Option<&str>,
        max_memory: Option<&str>,
        device: Option<&str>,
    ) -> Result<Placement, LoadError> {
        let given = [device_map.is_some(), max_memory.is_some(), device.is_some()];
        if given.iter().filter(|g| **g).count() > 1 {
            return Err(LoadError::Placement(
                "give at most one of --device-map, --max-memory and --device".to_string(),
            ));
        }
        if let Some(m) = device_map {
            return Self::parse_device_map(m);
        }
        if let Some(m) = max_memory {
            return Self::parse_max_memory(m);
        }
        Ok(Placement::Device(match device {
            Some(d) => parse_device(d)?,
            None => Device::Cpu,
        }))
    }

    /// The GPUs this placement names, each once: where the model (or a part of it) will run on CUDA.
    pub fn gpus(&self) -> Vec<Device> {
        let named: Vec<Device> = match self {
            Placement::Device(d) => vec![*d],
            Placement::Map(entries) => entries.iter().map(|(d, _)| *d).collect(),
            Placement::MaxMemory(budgets) => budgets.iter().map(|(d, _)| *d).collect(),
        };
        let mut gpus: Vec<Device> = Vec::new();
        for d in named {
            if d.is_cuda() && !gpus.contains(&d) {
                gpus.push(d);
            }
        }
        gpus
    }

    /// Parses an explicit map (syntax in [`Placement::from_args`]).
    pub fn parse_device_map(s: &str) -> Result<Placement, LoadError> {
        let mut out = Vec::new();
        let mut current: Option<Device> = None;
        for token in s.split(',').map(str::trim) {
            if token.is_empty() {
                return Err(LoadError::Placement(format!("empty entry in device map {s:?}")));
            }
            let items = match token.split_once('=') {
                Some((dev, items)) => {
                    current = Some(parse_device(dev)?);
                    items
                }
                None => token,
            };
            let Some(device) = current else {
                return Err(LoadError::Placement(format!(
                    "device map {s:?} must start with DEVICE=PARTS, e.g. cuda:0=0-13"
                )));
            };
            for item in items.split('+').map(str::trim) {
                out.push((device, parse_part(item)?));
            }
        }
        Ok(Placement::Map(out))
    }

    /// Parses `DEVICE=SIZE,…` budgets.
    pub fn parse_max_memory(s: &str) -> Result<Placement, LoadError> {
        let mut out: Vec<(Device, u64)> = Vec::new();
        for token in s.split(',').map(str::trim) {
            let Some((dev, size)) = token.split_once('=') else {
                return Err(LoadError::Placement(format!(
                    "bad --max-memory entry {token:?}: expected DEVICE=SIZE, e.g. cuda:0=10GiB"
                )));
            };
            let device = parse_device(dev)?;
            if out.iter().any(|(d, _)| *d == device) {
                return Err(LoadError::Placement(format!(
                    "device {} given twice in --max-memory",
                    device_name(device)
                )));
            }
            out.push((device, parse_bytes(size)?));
        }
        Ok(Placement::MaxMemory(out))
    }

    /// The device of every part for this model in this dtype. Does not check that the devices exist
    /// ([`DeviceMap::check_available`] does, at load).
    pub fn resolve(&self, cfg: &GptJConfig, dtype: Dtype) -> Result<DeviceMap, LoadError> {
        match self {
            Placement::Device(d) => Ok(DeviceMap::uniform(*d, cfg.n_layer)),
            Placement::Map(entries) => apply_map(entries, cfg.n_layer),
            Placement::MaxMemory(budgets) => plan(cfg, dtype, budgets, &PlanOptions::default()),
        }
    }
}

fn parse_part(item: &str) -> Result<PartSpec, LoadError> {
    let bad = || {
        LoadError::Placement(format!(
            "unknown part {item:?} in device map: expected a block index N, a range N-M, embed, norm or head"
        ))
    };
    // A part by its word here or by its module's name in a checkpoint (`wte`, `transformer.wte`, ...).
    let lower = item.to_ascii_lowercase();
    for (word, part, spec) in [
        ("embed", Part::Embed, PartSpec::Embed),
        ("norm", Part::Norm, PartSpec::Norm),
        ("head", Part::Head, PartSpec::Head),
    ] {
        if lower == word || lower == part.short_path() || lower == part.path() {
            return Ok(spec);
        }
    }
    let (a, b) = item.split_once('-').unwrap_or((item, item));
    let start: usize = a.trim().parse().map_err(|_| bad())?;
    let end: usize = b.trim().parse().map_err(|_| bad())?;
    if end < start {
        return Err(LoadError::Placement(format!(
            "block range {item:?} runs backwards"
        )));
    }
    Ok(PartSpec::Layers(start, end))
}

fn apply_map(entries: &[(Device, PartSpec)], n_layer: usize) -> Result<DeviceMap, LoadError> {
    let mut embed = None;
    let mut norm = None;
    let mut head = None;
    let mut layers: Vec<Option<Device>> = vec![None; n_layer];
    let twice = |what: String| LoadError::Placement(format!("{what} is placed twice in the device map"));
    for (device, part) in entries {
        match part {
            PartSpec::Embed => {
                if embed.replace(*device).is_some() {
                    return Err(twice("embed".into()));
                }
            }
            PartSpec::Norm => {
                if norm.replace(*device).is_some() {
                    return Err(twice("norm".into()));
                }
            }
            PartSpec::Head => {
                if head.replace(*device).is_some() {
                    return Err(twice("head".into()));
                }
            }
            PartSpec::Layers(start, end) => {
                if *end >= n_layer {
                    return Err(LoadError::Placement(format!(
                        "block {end} does not exist: the model has blocks 0-{}",
                        n_layer - 1
                    )));
                }
                for slot in &mut layers[*start..=*end] {
                    if slot.replace(*device).is_some() {
                        return Err(twice(format!("a block in {start}-{end}")));
                    }
                }
            }
        }
    }
    Ok(DeviceMap {
        embed: embed.unwrap_or(Device::Cpu),
        layers: layers.into_iter().map(|d| d.unwrap_or(Device::Cpu)).collect(),
        norm: norm.unwrap_or(Device::Cpu),
        head: head.unwrap_or(Device::Cpu),
    })
}

/// What the planner keeps free besides the weights.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanOptions {
    /// Sequences whose full-length (`n_positions`) KV cache must fit next to each block: contrastive search
    /// with its default `top_k` 4 runs 4 candidates plus the context.
    pub kv_sequences: u64,
}

impl Default for PlanOptions {
    fn default() -> Self {
        Self { kv_sequences: 1 }
    }
}

/// Bytes a part needs on its device: its weights, plus a block's KV cache.
pub fn part_bytes(cfg: &GptJConfig, dtype: Dtype, opts: &PlanOptions, part: Part) -> u64 {
    let b = dtype.size_in_bytes();
    let kv = match part {
        Part::Block(_) => 2 * cfg.n_positions as u64 * cfg.n_embd as u64 * b * opts.kv_sequences,
        Part::Embed | Part::Norm | Part::Head => 0,
    };
    part.params(cfg) * b + kv
}

/// Working memory every device used keeps free: a full-length prefill's attention scores (float32) and MLP
/// activations, per sequence.
pub fn activation_bytes(cfg: &GptJConfig, dtype: Dtype, opts: &PlanOptions) -> u64 {
    let p = cfg.n_positions as u64;
    let scores = cfg.n_head as u64 * p * p * 4;
    let mlp = p * (cfg.inner_dim() as u64 + 4 * cfg.n_embd as u64) * dtype.size_in_bytes();
    opts.kv_sequences * (scores + mlp)
}

/// Places the parts in forward order (embed, blocks, norm, head) on the budgeted devices, GPUs in the order
/// given and the CPU last, moving to the next device when the next part does not fit, as accelerate's
/// `infer_auto_device_map` does. Each device keeps [`activation_bytes`] free, and each block carries its KV
/// cache. Too little memory in total is [`LoadError::NotEnoughMemory`].
pub fn plan(
    cfg: &GptJConfig,
    dtype: Dtype,
    budgets: &[(Device, u64)],
    opts: &PlanOptions,
) -> Result<DeviceMap, LoadError> {
    if budgets.is_empty() {
        return Err(LoadError::Placement("--max-memory names no device".to_string()));
    }
    let mut order: Vec<(Device, u64)> = budgets
        .iter()
        .filter(|(d, _)| *d != Device::Cpu)
        .copied()
        .collect();
    order.extend(budgets.iter().filter(|(d, _)| *d == Device::Cpu).copied());

    let reserve = activation_bytes(cfg, dtype, opts);
    let sizes: Vec<u64> = Part::all(cfg.n_layer)
        .map(|part| part_bytes(cfg, dtype, opts, part))
        .collect();
    let needed = sizes.iter().sum::<u64>() + reserve;
    let available = order.iter().map(|(_, b)| *b).sum::<u64>();
    let not_enough = || LoadError::NotEnoughMemory { needed, available };

    let mut placed: Vec<Device> = Vec::with_capacity(sizes.len());
    let mut dev = 0;
    let mut free = order[0].1.checked_sub(reserve);
    for size in &sizes {
        loop {
            match free {
                Some(f) if f >= *size => {
                    free = Some(f - size);
                    placed.push(order[dev].0);
                    break;
                }
                _ => {
                    dev += 1;
                    if dev == order.len() {
                        return Err(not_enough());
                    }
                    free = order[dev].1.checked_sub(reserve);
                }
            }
        }
    }
    let n = cfg.n_layer;
    Ok(DeviceMap {
        embed: placed[0],
        layers: placed[1..=n].to_vec(),
        norm: placed[n + 1],
        head: placed[n + 2],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::total_params;

    fn gptj_6b() -> GptJConfig {
        GptJConfig::gpt_j_6b()
    }

    #[test]
    fn two_11_gb_gpus_split_a_12_gb_fp16_model() {
        let cfg = gptj_6b();
        let weights = total_params(&cfg) * 2;
        assert!(weights > 12_000_000_000 && weights < 12_200_000_000, "{weights}");
        let budgets = Placement::parse_max_memory("cuda:0=11GB,cuda:1=11GB").expect("parses");
        let map = budgets.resolve(&cfg, Dtype::Float16).expect("fits in 22 GB");
        assert_eq!(map.embed, Device::Cuda(0));
        assert_eq!(map.head, Device::Cuda(1));
        let on0 = map.layers.iter().filter(|d| **d == Device::Cuda(0)).count();
        let on1 = map.layers.iter().filter(|d| **d == Device::Cuda(1)).count();
        assert!(on0 > 0 && on1 > 0 && on0 + on1 == 28, "{}", map.describe());
        // Filled in order: the blocks on cuda:0 come first.
        assert!(
            map.layers[..on0].iter().all(|d| *d == Device::Cuda(0)),
            "{}",
            map.describe()
        );
        assert!(!map.devices().contains(&Device::Cpu));
    }

    #[test]
    fn a_gpu_too_small_for_everything_spills_onto_the_cpu_listed_first() {
        let cfg = gptj_6b();
        let map = Placement::parse_max_memory("cpu=64GiB,cuda:0=6GiB")
            .and_then(|p| p.resolve(&cfg, Dtype::Float16))
            .expect("fits");
        assert_eq!(
            map.embed,
            Device::Cuda(0),
            "GPUs are filled before the CPU whatever the order given"
        );
        assert_eq!(map.layers[27], Device::Cpu);
        assert_eq!(map.head, Device::Cpu);
        assert!(map.layers[0] == Device::Cuda(0));
    }

    #[test]
    fn too_little_memory_in_total_is_a_clear_error() {
        let cfg = gptj_6b();
        let err = Placement::parse_max_memory("cuda:0=4GiB,cpu=4GiB")
            .and_then(|p| p.resolve(&cfg, Dtype::Float16))
            .expect_err("12 GB do not fit in 8 GiB");
        assert!(matches!(err, LoadError::NotEnoughMemory { .. }), "{err}");
        assert!(err.to_string().contains("not enough memory"), "{err}");
    }

    #[test]
    fn the_kv_cache_and_activations_are_budgeted() {
        let cfg = gptj_6b();
        let weights = total_params(&cfg) * 2;
        // Exactly the weights is not enough: the KV cache and activations need room too.
        let err = plan(
            &cfg,
            Dtype::Float16,
            &[(Device::Cuda(0), weights)],
            &PlanOptions::default(),
        );
        assert!(matches!(err, Err(LoadError::NotEnoughMemory { .. })));
        let ok = plan(
            &cfg,
            Dtype::Float16,
            &[(Device::Cuda(0), weights + (2 << 30))],
            &PlanOptions::default(),
        );
        assert_eq!(ok.expect("fits").devices(), vec![Device::Cuda(0)]);
    }

    #[test]
    fn explicit_maps_place_named_parts_and_leave_the_rest_on_the_cpu() {
        let p = Placement::parse_device_map("cuda:0=0-13,cuda:1=14-27").expect("parses");
        let map = p.resolve(&gptj_6b(), Dtype::Float16).expect("resolves");
        assert_eq!(map.embed, Device::Cpu);
        assert_eq!(&map.layers[..14], &[Device::Cuda(0); 14]);
        assert_eq!(&map.layers[14..], &[Device::Cuda(1); 14]);
        assert_eq!((map.norm, map.head), (Device::Cpu, Device::Cpu));

        let p = Placement::parse_device_map("cuda:0=embed,0-13, cuda:1=14-27+norm+head").expect("parses");
        let map = p.resolve(&gptj_6b(), Dtype::Float16).expect("resolves");
        assert_eq!(
            (map.embed, map.norm, map.head),
            (Device::Cuda(0), Device::Cuda(1), Device::Cuda(1))
        );
        assert_eq!(
            map.describe(),
            "embed=cuda:0 h.0-13=cuda:0 h.14-27=cuda:1 norm=cuda:1 head=cuda:1"
        );
    }

    #[test]
    fn nonsense_maps_are_rejected_with_a_reason() {
        let cfg = gptj_6b();
        for (map, needle) in [
            ("cuda:0=0-13,cuda:1=13-27", "twice"),
            ("cuda:0=0-28", "does not exist"),
            ("cuda:0=5-2", "backwards"),
            ("0-13", "must start with"),
            ("tpu:0=0-3", "unknown device"),
            ("cuda:0=attn", "unknown part"),
            ("cuda:0=,cuda:1=1", "unknown part"),
            ("cuda:0=0-3,,cpu=4", "empty entry"),
            ("cuda:0=head,cpu=head", "twice"),
        ] {
            let err = Placement::parse_device_map(map)
                .and_then(|p| p.resolve(&cfg, Dtype::Float16))
                .expect_err(map)
                .to_string();
            assert!(err.contains(needle), "{map}: {err}");
        }
    }

    #[test]
    fn memory_sizes_and_flags_parse() {
        assert_eq!(parse_bytes("10GiB").ok(), Some(10 << 30));
        assert_eq!(parse_bytes("11GB").ok(), Some(11_000_000_000));
        assert_eq!(parse_bytes("1.5 MiB").ok(), Some(1_572_864));
        assert_eq!(parse_bytes("4096").ok(), Some(4096));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("10XB").is_err());
        assert!(Placement::parse_max_memory("cuda:0=1GB,cuda:0=2GB").is_err());
        assert!(Placement::parse_max_memory("cuda:0").is_err());
        assert_eq!(
            Placement::from_args(None, None, None).ok(),
            Some(Placement::Device(Device::Cpu))
        );
        assert_eq!(
            Placement::from_args(None, None, Some("cuda:1")).ok(),
            Some(Placement::Device(Device::Cuda(1)))
        );
        assert!(Placement::from_args(Some("cpu=0-1"), Some("cpu=1GB"), None).is_err());
        assert_eq!(
            Placement::from_args(None, Some("0=10GiB,cpu=1GiB"), None).ok(),
            Some(Placement::MaxMemory(vec![
                (Device::Cuda(0), 10 << 30),
                (Device::Cpu, 1 << 30)
            ]))
        );
    }

    #[test]
    fn the_gpus_a_placement_names_are_each_named_once_and_the_cpu_is_none() {
        let gpus = |map: Placement| map.gpus();
        assert_eq!(gpus(Placement::Device(Device::Cpu)), []);
        assert_eq!(gpus(Placement::Device(Device::Cuda(1))), [Device::Cuda(1)]);
        let map = Placement::parse_device_map("cuda:0=0-13,cuda:1=14-26,cuda:0=27,cpu=head").unwrap();
        assert_eq!(gpus(map), [Device::Cuda(0), Device::Cuda(1)]);
        let budget = Placement::parse_max_memory("cpu=8GiB,cuda:0=10GiB").unwrap();
        assert_eq!(gpus(budget), [Device::Cuda(0)]);
    }
}
