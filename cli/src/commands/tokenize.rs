//! `ft tokenize`: the tokenizer alone, without loading weights.

use ft_model::formats::gguf::GgufFile;
use ft_model::source;
use ft_model::TextTokenizer;

use crate::args::TokenizeArgs;

/// Prints the ids of `args.text` as a JSON array.
pub fn run(args: TokenizeArgs) -> anyhow::Result<()> {
    let path = source::resolve(&args.model)?;
    let tokenizer = if path.is_dir() {
        TextTokenizer::from_file(&path.join("tokenizer.json"), Vec::new(), None, None)?
    } else {
        TextTokenizer::from_gguf(&GgufFile::open(&path)?)?
    };
    let ids = tokenizer.encode(&args.text)?;
    println!("{}", serde_json::to_string(&ids)?);
    Ok(())
}
