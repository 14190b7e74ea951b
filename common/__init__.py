"""What both stages share. At the root, what everything uses: settings (`config`), errors and
per-image failures (`errors`), the logger (`log`), atomic files and the output lock (`io`), the
U-Net and its checkpoints (`model`), box geometry (`boxes`) and Dice (`metrics`). Then three
sub-packages by role: `data` (what is on disk), `training` (the loop and what feeds it) and
`prediction` (reader -> device step -> writer, and the jobs the predict commands run)."""
