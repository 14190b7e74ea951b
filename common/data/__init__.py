"""The data on disk: the Kaggle layout (`kaggle`), images and masks (`images`), the Kaggle RLE
(`rle`), prediction results in resumable chunks and the submission made from them (`chunks`),
and the generated sample cars (`synth`)."""
