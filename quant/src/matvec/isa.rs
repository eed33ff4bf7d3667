//! The instruction sets the kernels are written for, which of them this CPU has (detected
//! at run time, once), and the environment variable that caps the choice.

/// The environment variable that caps the kernels' instruction set ([`Isa::name`]).
pub const MAX_ISA_VAR: &str = "FT_MAX_ISA";

/// An instruction set a kernel is written for, in order of preference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Plain Rust, any CPU.
    Portable,
    /// x86-64 AVX2 with FMA and F16C.
    Avx2,
    /// AVX2 plus AVX-512 VNNI (`vpdpbusd` on 256-bit vectors, AVX512VL).
    Avx512Vnni,
    /// AVX-512 VNNI plus AMX-INT8 tiles for batches of at least
    /// [`AMX_ROWS`](super::AMX_ROWS) rows.
    Amx,
}

impl Isa {
    /// Every variant this CPU can run, portable first.
    pub fn available() -> Vec<Isa> {
        let mut out = vec![Isa::Portable];
        if avx2_detected() {
            out.push(Isa::Avx2);
        }
        if avx512_vnni_detected() {
            out.push(Isa::Avx512Vnni);
            #[cfg(target_arch = "x86_64")]
            if super::amx::detected() {
                out.push(Isa::Amx);
            }
        }
        out
    }

    /// The variant the kernels use (detected once): the best this CPU has, or the best at
    /// or below the one [`MAX_ISA_VAR`] names, so that the variants can be compared on one
    /// machine.
    pub fn active() -> Isa {
        static ACTIVE: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ACTIVE.get_or_init(|| {
            let most = std::env::var(MAX_ISA_VAR)
                .ok()
                .and_then(|name| Isa::from_name(&name));
            Isa::available()
                .into_iter()
                .rfind(|isa| most.is_none_or(|most| *isa <= most))
                .unwrap_or(Isa::Portable)
        })
    }

    /// The variant of [`Isa::name`] `name`.
    pub fn from_name(name: &str) -> Option<Isa> {
        [Isa::Portable, Isa::Avx2, Isa::Avx512Vnni, Isa::Amx]
            .into_iter()
            .find(|isa| isa.name() == name)
    }

    /// Whether the variant includes AVX2, FMA and F16C (every one but the portable one), so
    /// that the kernels written for AVX2 serve it.
    pub fn has_avx2(self) -> bool {
        self >= Isa::Avx2
    }

    /// The variant's name, for tables.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512-vnni",
            Isa::Amx => "amx",
        }
    }
}

fn avx512_vnni_detected() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        avx2_detected()
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn avx2_detected() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}
