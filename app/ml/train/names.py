"""Choice lists shared by the training library and the node specs (no torch here: node modules
import this at load time)."""

OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "prodigy", "lion", "lion8bit", "sgd_nesterov", "dadapt_adam",
              "schedulefree_adamw")
SCHEDULES = ("constant", "linear", "cosine", "cosine_restarts", "polynomial")
TIMESTEP_DISTRIBUTIONS = ("uniform", "logit_normal", "sigmoid")
LOSSES = ("mse", "mae", "huber")
WEIGHTINGS = ("constant", "min_snr", "debiased")
FLOW_TIMESTEPS = ("sigmoid", "logit_normal", "uniform")
FLOW_SHIFTS = ("resolution", "fixed", "none")
FLOW_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")

# TrainLoop version 1 held the noise objective's params; version 2 moved them to the NoiseObjective node.
NOISE_OBJECTIVE_PARAMS = ("prediction", "zero_terminal_snr", "offset_noise", "perturbation_noise", "timesteps",
                          "timestep_bias", "timestep_scale", "min_noising", "max_noising", "loss", "huber_delta",
                          "weighting", "min_snr_gamma")
