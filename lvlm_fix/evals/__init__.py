"""lvlm_fix.evals"""
