//! `ft merge`: W + scale * B A folded into every adapted layer, written as an HF folder or a
//! GGUF file that tools load without PEFT.

use ft_model::formats::bnb_write::save_pretrained;
use ft_model::formats::gguf_export::write_pretrained_gguf;
use ft_model::Pretrained;
use ft_model::QuantSpec;

use crate::args::MergeArgs;
use crate::device::Cpu;

/// Runs `ft merge`.
pub fn run(args: MergeArgs) -> anyhow::Result<()> {
    let device = Default::default();
    let mut p = Pretrained::<Cpu>::from_source(&args.model, Some(QuantSpec::F32), &device)?;
    p.attach_adapter(&args.adapter)?;
    p.model.merge_adapters();
    if args.format == "gguf" {
        write_pretrained_gguf(&p, args.gguf_type, &args.out)?;
    } else {
        save_pretrained(&p, QuantSpec::F32, &args.out)?;
    }
    println!(
        "merged {} into {}",
        args.adapter.display(),
        args.out.display()
    );
    Ok(())
}
