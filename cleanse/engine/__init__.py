"""The engine: training, evaluation, Grad-CAM, TAR. It never prints; it reports through callbacks."""
