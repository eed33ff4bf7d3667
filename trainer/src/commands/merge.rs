//! `ft merge`: W + scale * B A folded into every adapted layer, written as an HF folder that
//! any tool loads without PEFT.

use ft_model::bnb_format::save_pretrained;
use ft_model::Pretrained;
use ft_quant::QuantSpec;

use crate::cli::MergeArgs;
use crate::device::Cpu;

/// Runs `ft merge`.
pub fn run(args: MergeArgs) -> anyhow::Result<()> {
    let device = Default::default();
    let mut p = Pretrained::<Cpu>::from_source(&args.model, Some(QuantSpec::F32), &device)?;
    p.attach_adapter(&args.adapter)?;
    p.model.merge_adapters();
    save_pretrained(&p, QuantSpec::F32, &args.out)?;
    println!(
        "merged {} into {}",
        args.adapter.display(),
        args.out.display()
    );
    Ok(())
}
