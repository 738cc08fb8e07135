"""The names a user can choose from, in one place: the settings, the command line and the stages all
read them here, so a new model, split or format is named once. Imports nothing, so the command
line's parser can use it without loading torch."""

# audioshard.models.MODELS builds each
MODEL_NAMES = ("seed_cnn", "cnn6", "cnn10", "sepcnn", "panns_cnn14", "panns_cnn6")
BAND_NORM_MODELS = ("cnn6", "cnn10", "sepcnn")  # the models with a `model.input_norm = "bn"` layer (models.CNN6)
SPLITS = ("train", "val", "test")
PREDICT_FORMATS = ("table", "csv", "json")
EXPORT_FORMATS = ("safetensors", "onnx", "torchscript")

# `audioshard build --preset NAME`: ordinary settings, applied after --config and before any --set, so the
# manifest records the resulting [audio]/[features] values as always (the preset's name is not kept).
# PANNs' front ends (audioset_tagging_cnn, pytorch/models.py): periodic Hann window, centred reflect-padded
# STFT, power spectrum, Slaney mel filters, 10*log10(max(power, 1e-10)) with no top_db clipping.
FEATURE_PRESETS = {
    "panns16k": ("audio.sample_rate=16000", "features.n_fft=512", "features.hop_length=160", "features.n_mels=64",
                 "features.f_min=50.0", "features.f_max=8000.0", "features.top_db=0.0"),  # Cnn14_16k_mAP=0.438.pth
    "panns32k": ("audio.sample_rate=32000", "features.n_fft=1024", "features.hop_length=320", "features.n_mels=64",
                 "features.f_min=50.0", "features.f_max=14000.0", "features.top_db=0.0"),  # Cnn6_mAP=0.343.pth, Cnn14
}
