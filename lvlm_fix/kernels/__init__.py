"""lvlm_fix.kernels"""
