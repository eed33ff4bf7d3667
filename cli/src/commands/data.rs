//! `ft data tasks`: rebuilds the bundled task splits.

use anyhow::Context;

use crate::args::DataTasksArgs;
use ft_eval::tasks::TASKS;

/// Writes `<out>/<task>/{train,test}.jsonl` for every bundled task.
pub fn tasks(args: DataTasksArgs) -> anyhow::Result<()> {
    for task in TASKS {
        let dir = args.out.join(task.name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let (train, test) = task.generate();
        for (name, text) in [("train.jsonl", train), ("test.jsonl", test)] {
            let path = dir.join(name);
            ft_adapters::atomic::write_atomic(&path, text.as_bytes())
                .with_context(|| format!("writing {}", path.display()))?;
            println!("{} ({} examples)", path.display(), text.lines().count());
        }
    }
    Ok(())
}
