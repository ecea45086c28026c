"""lvlm_fix.gym"""
