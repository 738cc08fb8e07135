"""The names a user can choose from, in one place: the settings, the command line and the stages all
read them here, so a new model, split or format is named once. Imports nothing, so the command
line's parser can use it without loading torch."""

MODEL_NAMES = ("seed_cnn", "cnn6", "cnn10")  # audioshard.models.MODELS builds each
SPLITS = ("train", "val", "test")
PREDICT_FORMATS = ("table", "csv", "json")
EXPORT_FORMATS = ("onnx", "torchscript")
