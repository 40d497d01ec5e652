"""Choice lists shared by the training library and the node specs (no torch here: node modules
import this at load time)."""

OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "prodigy", "lion", "lion8bit", "sgd_nesterov", "dadapt_adam",
              "schedulefree_adamw")
SCHEDULES = ("constant", "linear", "cosine", "cosine_restarts", "polynomial")
TIMESTEP_DISTRIBUTIONS = ("uniform", "logit_normal", "sigmoid")
LOSSES = ("mse", "mae", "huber")
WEIGHTINGS = ("constant", "min_snr", "debiased")
