"""lvlm_fix.service"""
